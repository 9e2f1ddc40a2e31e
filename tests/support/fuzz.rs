//! What the stable-toolchain fuzz tests share: the checked-in corpora under
//! `fuzz/corpus/<target>/` and byte-level mutations of their seeds. A
//! missing or unreadable corpus fails the test at once.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::Rng;

/// `fuzz/corpus/<target>`.
pub fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
}

/// Every seed of `target`'s corpus, in file name order.
pub fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = corpus_dir(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {} missing ({e}); regenerate it", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

/// `seed` with one to four random edits: bit flips, cuts, inserted or
/// replaced bytes, random tails.
pub fn mutate(rng: &mut StdRng, seed: &[u8]) -> Vec<u8> {
    let mut data = seed.to_vec();
    for _ in 0..rng.gen_range(1..=4) {
        match rng.gen_range(0..5) {
            0 if !data.is_empty() => {
                let i = rng.gen_range(0..data.len());
                data[i] ^= 1 << rng.gen_range(0..8);
            }
            1 if !data.is_empty() => {
                let cut = rng.gen_range(0..data.len());
                data.truncate(cut);
            }
            2 => {
                let i = rng.gen_range(0..=data.len());
                data.insert(i, rng.gen());
            }
            3 if !data.is_empty() => {
                let i = rng.gen_range(0..data.len());
                data[i] = [0x00, 0xff, 0x7f, 0x80, 0x9f, 0xbf, 0x5b, 0x1b][rng.gen_range(0..8)];
            }
            _ => data.extend((0..rng.gen_range(0..16)).map(|_| rng.gen::<u8>())),
        }
    }
    data
}

/// The number of random inputs per target: `$var` if set, else `default`.
pub fn iterations(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
