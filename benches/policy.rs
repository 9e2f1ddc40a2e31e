//! Policy decision latency: one [`PolicyEngine::decide`] call — building the
//! Cedar entities from credential attributes, the context, evaluating, and
//! writing the reasons — against 100 policies of the kinds admins write
//! (per-service grants, team-scoped rules, registrations, time windows,
//! address restrictions, tag rules, break-glass), most of which do not match
//! the request.
//!
//! Two kinds of case: a principal–service pair decided before (the engine
//! keeps the pair's entities and candidate policies: a tunnel's re-decisions,
//! a user's next connection), and the first decision for a principal (every
//! sample a new identity, so nothing is cached but the policies).
//!
//! ```text
//! cargo bench --bench policy                 # 20 000 timed decisions per case
//! cargo bench --bench policy -- repeat       # only the cases whose name has "repeat"
//! ```
//!
//! Run without `--bench` (as `cargo test --all-targets` does) it is a smoke
//! test: a handful of decisions, checked for the expected outcome, no timing
//! claims. Target: p50 ≤ 10 µs per decision.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fmt::Write as _;
use std::hint::black_box;
use std::time::{Duration, Instant};

use postern_identity::{AttrValue, Identifier};
use postern_policies::{AccessRequest, Action, PolicyEngine, Principal, RequestContext, Service};

/// Timed decisions per case in a real run.
const SAMPLES: usize = 20_000;
/// Untimed decisions before timing.
const WARMUP: usize = 2_000;
/// Decisions per case in smoke mode.
const SMOKE_SAMPLES: usize = 5;
/// The goal for the median.
const TARGET_P50: Duration = Duration::from_micros(10);

/// 100 policies: the mix a mid-sized deployment might have.
fn policies() -> String {
    let mut p = String::new();
    // 40 per-service grants to a team (mostly other services).
    for i in 0..40 {
        writeln!(
            p,
            "@id(\"svc-{i}-team\")\npermit(principal, action == Action::\"connect\", resource == Service::\"svc-{i}\")\n\
             when {{ principal has team && principal.team == \"team-{}\" }};",
            i % 10
        )
        .unwrap();
    }
    // 20 team-scoped rules by group and environment.
    for i in 0..20 {
        writeln!(
            p,
            "@id(\"group-{i}\")\npermit(principal, action == Action::\"connect\", resource)\n\
             when {{ principal has groups && principal.groups.contains(\"group-{i}\") &&\n\
                     resource has env && resource.env == \"{}\" }};",
            ["dev", "staging", "prod"][i % 3]
        )
        .unwrap();
    }
    // 15 registrations.
    for i in 0..15 {
        writeln!(
            p,
            "@id(\"register-{i}\")\npermit(principal, action == Action::\"register\", resource == Service::\"svc-{i}\")\n\
             when {{ principal has role && principal.role == \"outlet-{i}\" }};"
        )
        .unwrap();
    }
    // 10 time windows.
    for i in 0..10 {
        writeln!(
            p,
            "@id(\"hours-{i}\")\npermit(principal, action == Action::\"connect\", resource)\n\
             when {{ principal has role && principal.role == \"shift-{i}\" &&\n\
                     context.weekday <= 5 && context.hour_utc >= {} && context.hour_utc < {} }};",
            i,
            i + 8
        )
        .unwrap();
    }
    // 5 address restrictions (forbids that every connect request evaluates).
    for i in 0..5 {
        writeln!(
            p,
            "@id(\"network-{i}\")\nforbid(principal, action == Action::\"connect\", resource)\n\
             when {{ resource has tier && resource.tier == \"tier-{i}\" &&\n\
                     !(context has source_ip && (context.source_ip.isInRange(ip(\"10.{i}.0.0/16\")) ||\n\
                       context.source_ip.isInRange(ip(\"192.168.{i}.0/24\")))) }};"
        )
        .unwrap();
    }
    // 9 rules on arbitrary credential attributes (tags).
    for i in 0..9 {
        writeln!(
            p,
            "@id(\"dept-{i}\")\npermit(principal, action == Action::\"connect\", resource)\n\
             when {{ principal.hasTag(\"department\") && principal.getTag(\"department\").contains(\"dept-{i}\") &&\n\
                     resource.hasTag(\"data-class\") && resource.getTag(\"data-class\").contains(\"internal\") }};"
        )
        .unwrap();
    }
    // 1 break-glass.
    writeln!(
        p,
        "@id(\"break-glass\")\npermit(principal, action == Action::\"connect\", resource)\n\
         when {{ principal.hasTag(\"incident\") && context has credential_expires &&\n\
                 context.credential_expires - context.time <= 3600 }};"
    )
    .unwrap();
    p
}

fn request(service: &str, team: &str) -> AccessRequest {
    request_from(7, service, team)
}

/// `request` for the principal with public key `key`.
fn request_from(key: u64, service: &str, team: &str) -> AccessRequest {
    let many = |vs: &[&str]| AttrValue::Many(vs.iter().map(|v| v.to_string()).collect());
    let mut public_key = [7; 32];
    public_key[..8].copy_from_slice(&key.to_le_bytes());
    AccessRequest {
        principal: Principal::new(Identifier::from_public_key(&public_key))
            .with_attr("team", AttrValue::One(team.into()))
            .with_attr("role", AttrValue::One("analyst".into()))
            .with_attr("groups", many(&["group-2", "oncall", "everyone"]))
            .with_attr("email", AttrValue::One("ana@example.com".into()))
            .with_attr("department", AttrValue::One("finance".into())),
        service: Service::new(service.parse().unwrap())
            .with_attr("env", AttrValue::One("staging".into()))
            .with_attr("team", AttrValue::One("team-2".into()))
            .with_attr("tier", AttrValue::One("tier-2".into())),
        context: RequestContext {
            time: 1_735_732_800,
            source_ip: Some("10.2.3.4".parse().unwrap()),
            relay: Some(Identifier::from_public_key(&[9; 32])),
            credential_expires: Some(1_735_736_400),
        },
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` does not.
    let smoke = !std::env::args().any(|a| a == "--bench");
    // Other arguments (not options) select cases by a part of their name.
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();

    let text = policies();
    let started = Instant::now();
    let engine = PolicyEngine::from_text("bench.cedar", &text).expect("bench policies are valid");
    let load = started.elapsed();
    assert_eq!(engine.len(), 100);

    let (samples, warmup) = if smoke {
        (SMOKE_SAMPLES, 0)
    } else {
        (SAMPLES, WARMUP)
    };
    let selected =
        |name: &str| filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str()));
    // Each case makes the request of decision `n`, untimed and just before
    // it, as a node builds it from the credential it has just verified.
    type Make = fn(u64) -> AccessRequest;
    let cases: [(&str, Action, Make, bool); 5] = [
        // svc-12 is granted to team-2: one permit among 100 matches.
        (
            "allow, repeat pair",
            Action::Connect,
            |_| request("svc-12", "team-2"),
            true,
        ),
        // Nothing grants team-x anything: default deny.
        (
            "deny, repeat pair",
            Action::Connect,
            |_| request("svc-12", "team-x"),
            false,
        ),
        (
            "register deny, repeat pair",
            Action::Register,
            |_| request("svc-3", "team-2"),
            false,
        ),
        // A new principal for every decision, warm-up included.
        (
            "allow, new principal",
            Action::Connect,
            |n| request_from(1000 + n, "svc-12", "team-2"),
            true,
        ),
        (
            "deny, new principal",
            Action::Connect,
            |n| request_from(1000 + n, "svc-12", "team-x"),
            false,
        ),
    ];

    println!(
        "policy decisions, 100 policies (loaded and validated in {:.1} ms){}",
        load.as_secs_f64() * 1e3,
        if smoke {
            " — smoke test, timings meaningless"
        } else {
            ""
        }
    );
    // Cases whose median misses the target.
    let mut missed: Vec<String> = Vec::new();
    for (name, action, make, expect) in &cases {
        if !selected(name) {
            continue;
        }
        // Checked on a clone of the engine's policies, so that the first
        // timed "new principal" decision is a first decision too.
        let check = PolicyEngine::from_text("bench.cedar", &text).expect("valid");
        let d = check.decide(*action, &make(0));
        assert_eq!(d.allow, *expect, "{name}: {}", d.audit_reason);
        assert!(d.errors.is_empty(), "{name}: {:?}", d.errors);
        let mut n = 0;
        for _ in 0..warmup {
            black_box(engine.decide(*action, black_box(&make(n))));
            n += 1;
        }
        let mut times = Vec::with_capacity(samples);
        for _ in 0..samples {
            let req = make(n);
            n += 1;
            let t = Instant::now();
            let d = engine.decide(*action, black_box(&req));
            times.push(t.elapsed());
            assert_eq!(d.allow, *expect, "{name}");
            black_box(d);
        }
        times.sort_unstable();
        let (p50, p99) = (percentile(&times, 0.50), percentile(&times, 0.99));
        if p50 > TARGET_P50 {
            missed.push(format!("{name} ({:.2} µs)", micros(p50)));
        }
        println!(
            "  {name:<27} p50 {:>7.2} µs   p99 {:>7.2} µs   ({} samples)",
            micros(p50),
            micros(p99),
            samples
        );
    }
    if !smoke {
        let target = TARGET_P50.as_micros();
        if missed.is_empty() {
            println!("target p50 ≤ {target} µs: met by every case run");
        } else {
            println!("target p50 ≤ {target} µs: NOT met by {}", missed.join(", "));
        }
    }
}
