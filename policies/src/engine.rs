//! The policy engine: Cedar policies loaded from files, validated against the
//! Postern schema, and evaluated for one request at a time.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::io::Read;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex, OnceLock};

use cedar_policy::{
    Effect, Policy, PolicyId, PolicySet, Schema, ValidationMode, ValidationWarning, Validator,
};
use cedar_policy_core::ast::{self, EntityUIDEntry, Value};
use cedar_policy_core::entities::{Entities, NoEntitiesSchema, TCComputation};
use cedar_policy_core::extensions::Extensions;
use postern_identity::wire::ServiceName;
use postern_identity::Attributes;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::diagnostics::{Diagnostic, DiagnosticKind, Diagnostics};
use crate::eval::{self, Compiled};
use crate::prefilter::{self, Assessment, Filter, GroupKey, Selection, Target};
use crate::request::{
    self, AccessRequest, Action, ContextUse, Field, Names, Referenced, Service, View,
};
use crate::{scan, Decision};

/// The Postern Cedar schema (Cedar schema syntax, no namespace).
pub const SCHEMA: &str = include_str!("postern.cedarschema");

const IMPOSSIBLE_HELP: &str = "check the attribute names it tests with `has`: an attribute \
the schema does not declare is never present. Identity declares identifier, team, role, groups, \
name and email; Service declares name, env, team, owner, tier and region; reach any other \
attribute with hasTag(\"…\") and getTag(\"…\"). Delete a policy rather than disable it with \
`when { false }`";

/// Largest policy file accepted, in bytes.
pub const MAX_POLICY_FILE_BYTES: u64 = 1024 * 1024;
/// Most `*.cedar` files accepted in one policy directory.
pub const MAX_POLICY_FILES: usize = 1000;
/// Largest total size of the policy files of one engine, in bytes.
pub const MAX_POLICY_TOTAL_BYTES: u64 = 16 * 1024 * 1024;

/// Why policies could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// A policy file or directory could not be read (local configuration).
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A policy file exceeds [`MAX_POLICY_FILE_BYTES`].
    #[error("{file} is larger than {limit} bytes, the limit for one policy file; split it into several files")]
    FileTooLarge {
        /// The file.
        file: String,
        /// The limit, bytes.
        limit: u64,
    },
    /// A directory holds more than [`MAX_POLICY_FILES`] policy files.
    #[error("{} holds more than {limit} *.cedar files, the limit; merge some of them", dir.display())]
    TooManyFiles {
        /// The directory.
        dir: PathBuf,
        /// The limit.
        limit: usize,
    },
    /// The files together exceed [`MAX_POLICY_TOTAL_BYTES`].
    #[error("the policy files total more than {limit} bytes, the limit")]
    TooMuchPolicy {
        /// The limit, bytes.
        limit: u64,
    },
    /// A policy file is not UTF-8 text.
    #[error("{file} is not UTF-8 text")]
    NotUtf8 {
        /// The file.
        file: String,
    },
    /// The policies have syntax or schema errors (local configuration); the
    /// diagnostics say where and what was expected.
    #[error("invalid policies:\n{0}")]
    Invalid(Diagnostics),
    /// The built-in schema did not load: a bug in Postern, not in the policies.
    #[error("internal error: {0}")]
    Internal(String),
}

/// Principal–service pairs whose entities and candidate policies are kept
/// per engine.
const PAIR_CACHE: usize = 1024;
/// Services whose entity is kept per engine.
const SERVICE_CACHE: usize = 64;
/// Source addresses whose Cedar value is kept per engine.
const ADDRESS_CACHE: usize = 4096;
/// Decision times whose Cedar `datetime` value is kept per engine.
const DATETIME_CACHE: usize = 64;

/// A small thread-safe map that forgets an arbitrary entry when full:
/// bounded memory without bookkeeping. A poisoned lock just disables it.
struct BoundedCache<K, V> {
    map: Mutex<HashMap<K, V, foldhash::fast::RandomState>>,
    capacity: usize,
}

impl<K: std::hash::Hash + Eq + Clone, V: Clone> BoundedCache<K, V> {
    fn new(capacity: usize) -> Self {
        BoundedCache {
            map: Mutex::new(HashMap::default()),
            capacity,
        }
    }

    fn get(&self, key: &K) -> Option<V> {
        self.map.lock().ok()?.get(key).cloned()
    }

    /// The value of `key`, built with `make` and kept when absent.
    fn get_or_try_insert<E>(&self, key: K, make: impl FnOnce() -> Result<V, E>) -> Result<V, E> {
        if let Some(value) = self.get(&key) {
            return Ok(value);
        }
        let value = make()?;
        self.insert(key, value.clone());
        Ok(value)
    }

    fn insert(&self, key: K, value: V) {
        if let Ok(mut map) = self.map.lock() {
            if map.len() >= self.capacity && !map.contains_key(&key) {
                // Forget one entry, an arbitrary one (the hash order is
                // random): freeing a whole full cache at once made one
                // decision in a thousand wait for it.
                if let Some(old) = map.keys().next().cloned() {
                    map.remove(&old);
                }
            }
            map.insert(key, value);
        }
    }
}

/// For one action, the policies whose scope admits it: those naming one
/// service, by service name; the others that share a leading check but for
/// its literal (see [`GroupKey`]), by group and literal; and the rest.
#[derive(Debug, Default)]
struct ScopeIndex {
    any_service: Vec<u32>,
    by_service: HashMap<String, Vec<u32>>,
    groups: Vec<Group>,
}

/// Policies sharing a [`GroupKey`].
#[derive(Debug)]
struct Group {
    key: GroupKey,
    /// By literal.
    by_literal: HashMap<String, Vec<u32>>,
    /// All of them, ascending.
    all: Vec<u32>,
}

/// Smaller groups are left with the rest: looking one up costs about as
/// much as checking its policies.
const MIN_GROUP: usize = 3;

impl ScopeIndex {
    fn new(filters: &[Filter], action: Action) -> Self {
        let mut index = ScopeIndex::default();
        let mut groups: HashMap<GroupKey, Group> = HashMap::new();
        let mut order: Vec<GroupKey> = Vec::new();
        for (filter, i) in filters.iter().zip(0u32..) {
            if !filter.admits_action(action.as_str()) {
                continue;
            }
            if let Some((_, id)) = filter.resource() {
                index.by_service.entry(id.to_owned()).or_default().push(i);
                continue;
            }
            match filter.group() {
                Some((key, literal)) => {
                    let group = groups.entry(key.clone()).or_insert_with(|| {
                        order.push(key.clone());
                        Group {
                            key,
                            by_literal: HashMap::new(),
                            all: Vec::new(),
                        }
                    });
                    group
                        .by_literal
                        .entry(literal.to_owned())
                        .or_default()
                        .push(i);
                    group.all.push(i);
                }
                None => index.any_service.push(i),
            }
        }
        for key in order {
            let Some(group) = groups.remove(&key) else {
                continue;
            };
            if group.all.len() < MIN_GROUP {
                index.any_service.extend_from_slice(&group.all);
            } else {
                index.groups.push(group);
            }
        }
        index.any_service.sort_unstable();
        index
    }

    /// Indices of the policies that may concern `target`, ascending: a
    /// superset of those the pre-filter does not find unsatisfied.
    fn candidates(&self, target: &Target<'_>) -> Vec<u32> {
        let named = self
            .by_service
            .get(target.resource.1)
            .map_or(&[][..], Vec::as_slice);
        let mut all = Vec::with_capacity(self.any_service.len() + named.len() + 8);
        all.extend_from_slice(&self.any_service);
        all.extend_from_slice(named);
        for group in &self.groups {
            match group.key.select(target) {
                Selection::Nothing => {}
                Selection::All => all.extend_from_slice(&group.all),
                Selection::Values(values) => {
                    for value in values {
                        if let Some(policies) = group.by_literal.get(value) {
                            all.extend_from_slice(policies);
                        }
                    }
                }
            }
        }
        all.sort_unstable();
        // A set with a repeated element selects a policy twice.
        all.dedup();
        all
    }
}

/// Everything about a decision that depends only on the principal and the
/// service, built on their first decision and kept ([`PAIR_CACHE`]): a
/// tunnel's later decisions, and the next connections of the same user to
/// the same service, only build the context and evaluate.
struct Prepared {
    /// The principal it was built for.
    principal: postern_identity::Identifier,
    principal_attrs: Attributes,
    /// The service it was built for.
    service: Arc<ServicePart>,
    /// The principal's identifier as text.
    identifier: String,
    /// `Identity::"…"` for Cedar's request.
    principal_uid: EntityUIDEntry,
    /// The principal and service entities.
    entities: Entities,
    /// Remarks from translating the attributes (the principal's, then the
    /// service's).
    notes: Vec<String>,
    /// The principal's attributes as JSON, for audit reasons.
    principal_json: String,
    /// By action (connect, register): the policies that may apply, found on
    /// the pair's first decision of that action (a node normally decides
    /// only one of them).
    candidates: [OnceLock<Candidates>; 2],
}

impl Prepared {
    fn matches(&self, request: &AccessRequest) -> bool {
        self.principal == request.principal.identifier
            && self.principal_attrs == request.principal.attrs
            && self.service.matches(&request.service)
    }
}

/// What the decisions about one service share, kept per engine
/// ([`SERVICE_CACHE`]): an outlet decides about one service, a relay about a
/// few, so a new principal's first decision reuses it.
struct ServicePart {
    name: ServiceName,
    attrs: Attributes,
    /// `Service::"…"` for Cedar's request.
    uid: EntityUIDEntry,
    /// The service entity.
    entity: Arc<ast::Entity>,
    /// Remarks from translating the attributes.
    notes: Vec<String>,
    /// The attributes as JSON, for audit reasons.
    json: String,
}

impl ServicePart {
    fn matches(&self, service: &Service) -> bool {
        self.name == service.name && self.attrs == service.attrs
    }
}

/// The policies that may apply to one principal, action and service: those
/// the pre-filter found satisfied, those only Cedar can decide, and the
/// context fields the latter read.
struct Candidates {
    satisfied: Box<[u32]>,
    policies: Box<[u32]>,
    context: ContextUse,
}

/// A hash of `value` for the caches' keys (entries are compared in full
/// before use, so a collision only costs a rebuild).
fn fingerprint(value: &impl std::hash::Hash) -> u64 {
    use std::hash::BuildHasher;
    static KEYS: OnceLock<foldhash::fast::RandomState> = OnceLock::new();
    KEYS.get_or_init(Default::default).hash_one(value)
}

/// The parsed schema, once per process.
fn schema() -> Result<&'static Schema, PolicyError> {
    static SCHEMA_CELL: OnceLock<Result<Schema, String>> = OnceLock::new();
    SCHEMA_CELL
        .get_or_init(|| {
            Schema::from_cedarschema_str(SCHEMA)
                .map(|(schema, _warnings)| schema)
                .map_err(|e| format!("the built-in Cedar schema does not parse: {e}"))
        })
        .as_ref()
        .map_err(|e| PolicyError::Internal(e.clone()))
}

/// Whether a policy grants or refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyEffect {
    /// `permit(…)`.
    Permit,
    /// `forbid(…)`.
    Forbid,
}

impl fmt::Display for PolicyEffect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PolicyEffect::Permit => "permit",
            PolicyEffect::Forbid => "forbid",
        })
    }
}

/// Where a loaded policy came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PolicyInfo {
    /// Its id: the `@id("…")` annotation, or `FILE:LINE` (file name without
    /// directory) when it has none.
    pub id: String,
    /// The file, as named to the loader.
    pub file: String,
    /// The line it starts on (its first annotation, or `permit`/`forbid`).
    pub line: usize,
    /// Permit or forbid.
    pub effect: PolicyEffect,
}

/// The outcome of one decision, with the reasons for the user and for the
/// audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PolicyDecision {
    /// Whether access is granted. False whenever anything went wrong.
    pub allow: bool,
    /// The action decided.
    pub action: Action,
    /// The service it was about.
    pub service: String,
    /// Ids of the policies that decided: the permits that allowed, or the
    /// forbids that denied (empty for a default deny).
    pub determining_policies: Vec<String>,
    /// Evaluation errors (each one makes the decision a deny). May quote
    /// attribute values: for the operator, not the requesting user.
    pub errors: Vec<String>,
    /// Remarks about the request, such as credential attributes that could not
    /// be given their schema type. May quote attribute names.
    pub notes: Vec<String>,
    /// Why, in words the requesting user may see: policy ids and the service
    /// name, never attribute values.
    pub user_reason: String,
    /// Why, in full, for the operator's log and the audit record: principal,
    /// attributes, context, policies, errors and notes.
    pub audit_reason: String,
}

impl PolicyDecision {
    /// As the enforcement points' [`Decision`].
    pub fn to_decision(&self) -> Decision {
        if self.allow {
            Decision::Allow
        } else {
            Decision::Deny {
                reason: self.user_reason.clone(),
            }
        }
    }
}

/// A validated set of Cedar policies and the means to evaluate them.
///
/// Cheap to share (`Send + Sync`); reload by building a new engine and
/// swapping it in, so a broken file never replaces working policies.
pub struct PolicyEngine {
    /// The policies by index, as in `infos`, for the reference evaluation
    /// tests compare with.
    #[cfg(test)]
    cedar: Vec<Policy>,
    /// The policies by index, ready to evaluate.
    compiled: Vec<Compiled>,
    /// Pre-filters, by index.
    filters: Vec<Filter>,
    /// Context fields each policy reads, by index.
    context_use: Vec<ContextUse>,
    /// Entity attributes and tags some policy reads.
    referenced: Referenced,
    /// Indices of the policies whose scope admits each action, by service.
    index: [ScopeIndex; 2],
    /// Principal and service → what their decisions share.
    prepared: BoundedCache<u64, Arc<Prepared>>,
    /// Service → what its decisions share.
    services: BoundedCache<u64, Arc<ServicePart>>,
    /// Source address → its Cedar value.
    addresses: BoundedCache<IpAddr, Value>,
    /// Unix time → its Cedar `datetime` value.
    datetimes: BoundedCache<u64, Value>,
    /// The actions (connect, register) for Cedar's request.
    actions: [EntityUIDEntry; 2],
    infos: Vec<PolicyInfo>,
    /// How reasons name each policy, by index.
    rendered: Vec<Rendered>,
    by_id: HashMap<String, usize>,
    warnings: Vec<Diagnostic>,
    files: usize,
    digest: String,
    names: Names,
}

impl fmt::Debug for PolicyEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PolicyEngine")
            .field("files", &self.files)
            .field("policies", &self.infos.len())
            .field("digest", &self.digest)
            .finish_non_exhaustive()
    }
}

/// One policy file's name (as shown in diagnostics) and text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicySource {
    /// The name diagnostics use, normally the path.
    pub file: String,
    /// The Cedar text.
    pub text: String,
}

impl PolicySource {
    /// A source named `file` with `text`.
    pub fn new(file: impl Into<String>, text: impl Into<String>) -> Self {
        PolicySource {
            file: file.into(),
            text: text.into(),
        }
    }
}

/// Reads the `*.cedar` files of `dir` (not recursively; names starting with
/// `.`, such as editors' temporary files, are skipped), sorted by name.
pub fn read_policy_dir(dir: &Path) -> Result<Vec<PolicySource>, PolicyError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| PolicyError::Io { path, source }
    };
    let mut paths = Vec::new();
    for entry in fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with('.') || !name.ends_with(".cedar") {
            continue;
        }
        let path = entry.path();
        // Follows symbolic links, as configuration managers often use them.
        if !fs::metadata(&path).map_err(io(&path))?.is_file() {
            continue;
        }
        paths.push(path);
        if paths.len() > MAX_POLICY_FILES {
            return Err(PolicyError::TooManyFiles {
                dir: dir.to_path_buf(),
                limit: MAX_POLICY_FILES,
            });
        }
    }
    paths.sort();
    let mut total = 0u64;
    let mut sources = Vec::with_capacity(paths.len());
    for path in paths {
        let file = path.display().to_string();
        let mut bytes = Vec::new();
        fs::File::open(&path)
            .and_then(|f| f.take(MAX_POLICY_FILE_BYTES + 1).read_to_end(&mut bytes))
            .map_err(io(&path))?;
        let len = bytes.len() as u64;
        if len > MAX_POLICY_FILE_BYTES {
            return Err(PolicyError::FileTooLarge {
                file,
                limit: MAX_POLICY_FILE_BYTES,
            });
        }
        total += len;
        if total > MAX_POLICY_TOTAL_BYTES {
            return Err(PolicyError::TooMuchPolicy {
                limit: MAX_POLICY_TOTAL_BYTES,
            });
        }
        let text =
            String::from_utf8(bytes).map_err(|_| PolicyError::NotUtf8 { file: file.clone() })?;
        sources.push(PolicySource { file, text });
    }
    Ok(sources)
}

/// The generated id Cedar gives the `n`th policy of a text (`policy<n>`).
fn generated_index(id: &PolicyId) -> usize {
    id.to_string()
        .strip_prefix("policy")
        .and_then(|n| n.parse().ok())
        .unwrap_or(usize::MAX)
}

/// The file name without its directory, for generated policy ids.
fn short_name(file: &str) -> &str {
    file.rsplit(['/', '\\']).next().unwrap_or(file)
}

impl PolicyEngine {
    /// An engine with no policies: it denies everything.
    pub fn empty() -> Result<Self, PolicyError> {
        Self::from_sources(Vec::new())
    }

    /// Loads and validates the `*.cedar` files of `dir` (see
    /// [`read_policy_dir`]). An empty directory gives an empty engine.
    pub fn from_dir(dir: &Path) -> Result<Self, PolicyError> {
        Self::from_sources(read_policy_dir(dir)?)
    }

    /// Loads and validates one text, named `file` in diagnostics.
    pub fn from_text(file: &str, text: &str) -> Result<Self, PolicyError> {
        Self::from_sources(vec![PolicySource::new(file, text)])
    }

    /// Loads and validates policy sources. All problems in all files are
    /// reported together in [`PolicyError::Invalid`].
    pub fn from_sources(sources: Vec<PolicySource>) -> Result<Self, PolicyError> {
        let schema = schema()?;
        let names = Names::new().map_err(PolicyError::Internal)?;
        let mut total = 0u64;
        for s in &sources {
            let len = s.text.len() as u64;
            if len > MAX_POLICY_FILE_BYTES {
                return Err(PolicyError::FileTooLarge {
                    file: s.file.clone(),
                    limit: MAX_POLICY_FILE_BYTES,
                });
            }
            total += len;
        }
        if total > MAX_POLICY_TOTAL_BYTES {
            return Err(PolicyError::TooMuchPolicy {
                limit: MAX_POLICY_TOTAL_BYTES,
            });
        }

        let mut problems = Vec::new();
        let mut policies = PolicySet::new();
        let mut cedar: Vec<Policy> = Vec::new();
        let mut infos: Vec<PolicyInfo> = Vec::new();
        let mut by_id: HashMap<String, usize> = HashMap::new();
        // Policy id → index into `sources`, to position validation errors.
        let mut source_of: HashMap<String, usize> = HashMap::new();

        for (index, source) in sources.iter().enumerate() {
            let (file, text) = (source.file.as_str(), source.text.as_str());
            if let Err(d) = scan::check(file, text) {
                problems.push(*d);
                continue;
            }
            let parsed =
                match PolicySet::from_str(text) {
                    Ok(set) => set,
                    Err(errors) => {
                        problems.extend(errors.iter().map(|e| {
                            Diagnostic::from_miette(DiagnosticKind::Syntax, file, text, e)
                        }));
                        continue;
                    }
                };
            // Cedar numbers the policies of a text in order (`policy0`, …);
            // each one's text is an exact excerpt of the file, so a forward
            // search from the end of the previous one finds where it starts.
            let mut ordered: Vec<(usize, Option<&cedar_policy::Policy>, String)> = parsed
                .policies()
                .map(|p| (generated_index(p.id()), Some(p), p.to_string()))
                .chain(
                    parsed
                        .templates()
                        .map(|t| (generated_index(t.id()), None, t.to_string())),
                )
                .collect();
            ordered.sort_by_key(|(n, _, _)| *n);
            let mut cursor = 0;
            for (_, policy, policy_text) in ordered {
                let offset = text[cursor..]
                    .find(&policy_text)
                    .map_or(cursor, |i| cursor + i);
                cursor = offset + policy_text.len().min(text.len() - offset);
                let line = text[..offset].matches('\n').count() + 1;
                let Some(policy) = policy else {
                    let mut d = Diagnostic::at(
                        DiagnosticKind::Unsupported,
                        file,
                        text,
                        offset,
                        policy_text.len(),
                        "templates (policies with `?principal` or `?resource`) are not supported"
                            .into(),
                    );
                    d.help = Some(
                        "name the principal or resource, or drop the `== ?…` constraint".into(),
                    );
                    problems.push(d);
                    continue;
                };
                let id = match policy.annotation("id") {
                    Some(id) => id.to_owned(),
                    None => {
                        let base = format!("{}:{line}", short_name(file));
                        if by_id.contains_key(&base) {
                            let line_start = text[..offset].rfind('\n').map_or(0, |nl| nl + 1);
                            let column = text[line_start..offset].chars().count() + 1;
                            format!("{base}:{column}")
                        } else {
                            base
                        }
                    }
                };
                if id.trim().is_empty() || id.chars().any(char::is_control) {
                    let mut d = Diagnostic::at(
                        DiagnosticKind::Unsupported,
                        file,
                        text,
                        offset,
                        policy_text.len(),
                        "a policy id must be non-empty and have no control characters".into(),
                    );
                    d.help = Some("write an @id like @id(\"analysts-read-staging\")".into());
                    problems.push(d);
                    continue;
                }
                if let Some(&other) = by_id.get(&id) {
                    let first = &infos[other];
                    let mut d = Diagnostic::at(
                        DiagnosticKind::Unsupported,
                        file,
                        text,
                        offset,
                        policy_text.len(),
                        format!(
                            "policy id {id:?} is already used by the policy at {}:{}",
                            first.file, first.line
                        ),
                    );
                    d.policy = Some(id);
                    d.help = Some("give every policy a distinct @id".into());
                    problems.push(d);
                    continue;
                }
                let effect = match policy.effect() {
                    Effect::Permit => PolicyEffect::Permit,
                    Effect::Forbid => PolicyEffect::Forbid,
                };
                let renamed = policy.new_id(PolicyId::new(id.clone()));
                if let Err(e) = policies.add(renamed.clone()) {
                    return Err(PolicyError::Internal(format!("adding policy {id:?}: {e}")));
                }
                cedar.push(renamed);
                by_id.insert(id.clone(), infos.len());
                source_of.insert(id.clone(), index);
                infos.push(PolicyInfo {
                    id,
                    file: file.to_owned(),
                    line,
                    effect,
                });
            }
        }

        // Validate whatever parsed, so that one run reports the problems of
        // every file.
        let mut warnings = Vec::new();
        {
            let result = Validator::new(schema.clone()).validate(&policies, ValidationMode::Strict);
            let place = |id: &PolicyId| -> (&str, &str) {
                source_of
                    .get(id.to_string().as_str())
                    .and_then(|&i| sources.get(i))
                    .map_or(("", ""), |s| (s.file.as_str(), s.text.as_str()))
            };
            for e in result.validation_errors() {
                let (file, text) = place(e.policy_id());
                let mut d = Diagnostic::from_miette(DiagnosticKind::Schema, file, text, e);
                d.policy = Some(e.policy_id().to_string());
                problems.push(d);
            }
            let failed: std::collections::HashSet<String> = result
                .validation_errors()
                .map(|e| e.policy_id().to_string())
                .collect();
            for w in result.validation_warnings() {
                // A policy with errors gets no further remarks.
                if failed.contains(w.policy_id().to_string().as_str()) {
                    continue;
                }
                let (file, text) = place(w.policy_id());
                // Cedar calls these warnings; for access control they are
                // errors. A policy that can never apply is nearly always a
                // misspelt attribute behind `has` (which is then false), and
                // a forbid that silently never applies is dangerous.
                // Bidirectional-text controls can hide what a policy says.
                let kind = match w {
                    ValidationWarning::ImpossiblePolicy(_) => DiagnosticKind::Schema,
                    ValidationWarning::BidiCharsInString(_)
                    | ValidationWarning::BidiCharsInIdentifier(_) => DiagnosticKind::Unsupported,
                    _ => DiagnosticKind::Warning,
                };
                let mut d = Diagnostic::from_miette(kind, file, text, w);
                d.policy = Some(w.policy_id().to_string());
                if matches!(w, ValidationWarning::ImpossiblePolicy(_)) {
                    d.help = Some(IMPOSSIBLE_HELP.into());
                }
                if kind == DiagnosticKind::Warning {
                    warnings.push(d);
                } else {
                    problems.push(d);
                }
            }
        }
        if !problems.is_empty() {
            problems.sort_by(|a, b| (&a.file, a.line, a.column).cmp(&(&b.file, b.line, b.column)));
            problems.extend(warnings);
            return Err(PolicyError::Invalid(Diagnostics(problems)));
        }

        let filters: Vec<Filter> = cedar.iter().map(Filter::new).collect();
        let context_use = cedar.iter().map(prefilter::context_use).collect();
        let referenced = cedar
            .iter()
            .map(prefilter::referenced)
            .fold(Referenced::none(), Referenced::union);
        let compiled = cedar.iter().map(Compiled::new).collect();
        let actions = [
            eval::known(names.action(Action::Connect)),
            eval::known(names.action(Action::Register)),
        ];
        let index = [
            ScopeIndex::new(&filters, Action::Connect),
            ScopeIndex::new(&filters, Action::Register),
        ];
        let mut hash = Sha256::new();
        for s in &sources {
            for part in [s.file.as_bytes(), s.text.as_bytes()] {
                hash.update((part.len() as u64).to_be_bytes());
                hash.update(part);
            }
        }
        Ok(PolicyEngine {
            rendered: infos.iter().map(Rendered::new).collect(),
            infos,
            by_id,
            warnings,
            files: sources.len(),
            digest: hex::encode(hash.finalize()),
            names,
            index,
            prepared: BoundedCache::new(PAIR_CACHE),
            services: BoundedCache::new(SERVICE_CACHE),
            #[cfg(test)]
            cedar,
            compiled,
            filters,
            context_use,
            referenced,
            addresses: BoundedCache::new(ADDRESS_CACHE),
            datetimes: BoundedCache::new(DATETIME_CACHE),
            actions,
        })
    }

    /// Whether there are no policies, so that everything is denied. A node
    /// should say so at start-up ("no policies: admitting nobody").
    pub fn is_empty(&self) -> bool {
        self.infos.is_empty()
    }

    /// Number of policies.
    pub fn len(&self) -> usize {
        self.infos.len()
    }

    /// Number of files the policies came from.
    pub fn file_count(&self) -> usize {
        self.files
    }

    /// The policies, in file order.
    pub fn policies(&self) -> &[PolicyInfo] {
        &self.infos
    }

    /// The policy with id `id`.
    pub fn policy(&self, id: &str) -> Option<&PolicyInfo> {
        self.by_id.get(id).map(|&i| &self.infos[i])
    }

    /// Validator warnings (accepted, but probably mistakes).
    pub fn warnings(&self) -> &[Diagnostic] {
        &self.warnings
    }

    /// SHA-256 (hex) of the file names and texts: identifies a policy version
    /// in logs and audit records.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// Decides whether `request.principal` may perform `action` on
    /// `request.service`. Default deny: allowed only if some permit applies,
    /// no forbid applies, and nothing failed — an evaluation error in any
    /// policy, even one that would not have mattered, makes it a deny.
    ///
    /// Only the policies that can apply reach Cedar (see the crate docs,
    /// "Cost"); the outcome, deciding policies and errors are those of Cedar
    /// evaluating every policy. Never panics; any failure is a deny with the
    /// reason in `errors`.
    pub fn decide(&self, action: Action, request: &AccessRequest) -> PolicyDecision {
        let service = request.service.name.as_str();
        let prepared = self.prepare(action, request);
        let outcome = match &prepared {
            Ok(prepared) => self.evaluate(action, request, prepared),
            Err(e) => Err(e.clone()),
        };
        let (allow, determining, errors) = match outcome {
            Ok((allowed, policies, errors)) => (allowed && errors.is_empty(), policies, errors),
            Err(error) => (false, Vec::new(), vec![error]),
        };
        let rendered: Vec<&Rendered> = determining
            .iter()
            .filter_map(|&i| self.rendered.get(i as usize))
            .collect();
        let prepared = prepared.ok();
        let notes = prepared
            .as_ref()
            .map(|p| p.notes.clone())
            .unwrap_or_default();
        let quoted = || join(rendered.iter().map(|r| r.quoted.as_str()));
        let plural = |n: usize| if n == 1 { "policy" } else { "policies" };
        let user_reason = if allow {
            format!(
                "{action} to {service} permitted by {} {}",
                plural(rendered.len()),
                quoted()
            )
        } else if !errors.is_empty() {
            format!("{action} to {service} denied: a policy could not be evaluated (the operator's log has the details)")
        } else if !rendered.is_empty() {
            format!(
                "{action} to {service} forbidden by {} {}",
                plural(rendered.len()),
                quoted()
            )
        } else if self.is_empty() {
            format!("{action} to {service} denied: no policies are loaded, so nothing is permitted (default deny)")
        } else {
            format!("no policy permits {action} to {service}")
        };
        let audit_reason = self.audit_reason(
            &user_reason,
            action,
            request,
            prepared.as_deref(),
            &rendered,
            &errors,
            &notes,
        );
        PolicyDecision {
            allow,
            action,
            service: service.to_owned(),
            determining_policies: rendered.iter().map(|r| r.id.clone()).collect(),
            errors,
            notes,
            user_reason,
            audit_reason,
        }
    }

    /// What the decisions of the request's principal and service share, with
    /// the candidates for `action`: from the cache, or built and cached.
    fn prepare(&self, action: Action, request: &AccessRequest) -> Result<Arc<Prepared>, String> {
        let service_key = fingerprint(&(&request.service.name, &request.service.attrs));
        let pair_key = fingerprint(&(
            &request.principal.identifier,
            &request.principal.attrs,
            service_key,
        ));
        if let Some(prepared) = self.prepared.get(&pair_key) {
            if prepared.matches(request) {
                prepared.candidates[action_index(action)].get_or_init(|| {
                    let identifier = request.principal.identifier.to_string();
                    let mut notes = Vec::new();
                    let principal =
                        View::principal(&request.principal, identifier.clone(), &mut notes);
                    let service = View::service(&request.service, &mut notes);
                    self.candidates(
                        action,
                        &target(action, request, &identifier, &principal, &service),
                    )
                });
                return Ok(prepared);
            }
        }
        let service_part = match self.services.get(&service_key) {
            Some(part) if part.matches(&request.service) => part,
            _ => {
                let part = Arc::new(self.service_part(&request.service));
                self.services.insert(service_key, Arc::clone(&part));
                part
            }
        };
        let identifier = request.principal.identifier.to_string();
        let mut notes = Vec::new();
        let principal = View::principal(&request.principal, identifier.clone(), &mut notes);
        notes.extend(service_part.notes.iter().cloned());
        let service = View::service(&request.service, &mut Vec::new());
        let candidates = [OnceLock::new(), OnceLock::new()];
        // Cannot already be set.
        let _ = candidates[action_index(action)].set(self.candidates(
            action,
            &target(action, request, &identifier, &principal, &service),
        ));
        let principal_uid = self.names.principal_uid(&identifier);
        // The entities are built from the request's typed values to match
        // the schema by construction (a test checks them against the schema
        // through Cedar's checked API), so Cedar's schema checks are skipped.
        let entities = Entities::new()
            .add_entities(
                [
                    Arc::new(principal.core_entity(principal_uid.clone().into(), &self.referenced)),
                    Arc::clone(&service_part.entity),
                ],
                None::<&NoEntitiesSchema>,
                TCComputation::AssumeAlreadyComputed,
                Extensions::none(),
            )
            .map_err(|e| format!("entities: {e}"))?;
        let prepared = Arc::new(Prepared {
            principal: request.principal.identifier,
            principal_attrs: request.principal.attrs.clone(),
            service: service_part,
            principal_json: json(&request.principal.attrs),
            identifier,
            principal_uid: eval::known(&principal_uid),
            entities,
            notes,
            candidates,
        });
        self.prepared.insert(pair_key, Arc::clone(&prepared));
        Ok(prepared)
    }

    /// What the decisions about `service` share.
    fn service_part(&self, service: &Service) -> ServicePart {
        let mut notes = Vec::new();
        let view = View::service(service, &mut notes);
        let uid = self.names.service_uid(&service.name);
        ServicePart {
            name: service.name.clone(),
            attrs: service.attrs.clone(),
            entity: Arc::new(view.core_entity(uid.clone().into(), &self.referenced)),
            uid: eval::known(&uid),
            notes,
            json: json(&service.attrs),
        }
    }

    /// The policies that may apply to `target` (see the crate docs, "Cost").
    fn candidates(&self, action: Action, target: &Target<'_>) -> Candidates {
        let index = &self.index[action_index(action)];
        let (mut satisfied, mut policies) = (Vec::new(), Vec::new());
        for i in index.candidates(target) {
            match self.filters.get(i as usize).map(|f| f.assess(target)) {
                Some(Assessment::Unsatisfied) => {}
                Some(Assessment::Satisfied) => satisfied.push(i),
                Some(Assessment::Evaluate) | None => policies.push(i),
            }
        }
        let context = policies
            .iter()
            .filter_map(|&i| self.context_use.get(i as usize))
            .fold(ContextUse::NONE, |a, b| a.union(*b));
        Candidates {
            satisfied: satisfied.into(),
            policies: policies.into(),
            context,
        }
    }

    /// Runs Cedar on the policies that may apply:
    /// `(allowed, determining policy indices, errors)`.
    fn evaluate(
        &self,
        action: Action,
        request: &AccessRequest,
        prepared: &Prepared,
    ) -> Result<(bool, Vec<u32>, Vec<String>), String> {
        let index = action_index(action);
        let action_uid = &self.actions[index];
        let Some(candidates) = prepared.candidates[index].get() else {
            return Err("internal error: no candidate policies for the action".into());
        };
        let outcome = if candidates.policies.is_empty() {
            // Decided without Cedar: nothing left could be satisfied or fail.
            eval::Outcome::of_satisfied(&self.compiled, &candidates.satisfied)
        } else {
            // Only the fields the candidates read: nothing else can observe
            // the others, and extension values are the costly ones to build.
            let mut context = Vec::with_capacity(4);
            for (name, field) in request::context_fields(&request.context, candidates.context)? {
                context.push((name, self.value(field)?));
            }
            let cedar_request = eval::request(
                &prepared.principal_uid,
                action_uid,
                &prepared.service.uid,
                eval::context(context),
            );
            eval::evaluate(
                &self.compiled,
                &candidates.satisfied,
                &candidates.policies,
                cedar_request,
                &prepared.entities,
            )
        };
        Ok((
            outcome.allowed(),
            outcome.determining().to_vec(),
            outcome.errors,
        ))
    }

    /// A context field as a Cedar value; extension values are cached.
    fn value(&self, field: Field) -> Result<Value, String> {
        let build = || eval::value_of(field.expression());
        match field {
            Field::Long(v) => Ok(Value::from(v)),
            Field::Str(ref v) => Ok(Value::from(v.as_str())),
            Field::Ip(ip) => self.addresses.get_or_try_insert(ip, build),
            Field::DateTime(t) => self.datetimes.get_or_try_insert(t, build),
        }
    }

    /// Cedar's public authorizer over every policy, with schema-checked
    /// entities, context and request built through Cedar's public API: what
    /// [`PolicyEngine::decide`]'s shortcuts must agree with.
    #[cfg(test)]
    pub(crate) fn evaluate_reference(
        &self,
        action: Action,
        request: &AccessRequest,
    ) -> Result<(bool, Vec<String>, Vec<String>), String> {
        let schema = schema().map_err(|e| e.to_string())?;
        let mut all = PolicySet::new();
        for policy in &self.cedar {
            all.add(policy.clone()).map_err(|e| e.to_string())?;
        }
        let mut notes = Vec::new();
        let identifier = request.principal.identifier.to_string();
        let principal = View::principal(&request.principal, identifier.clone(), &mut notes);
        let service = View::service(&request.service, &mut notes);
        let principal_uid = self.names.principal_uid(&identifier);
        let service_uid = self.names.service_uid(&request.service.name);
        let entities = cedar_policy::Entities::from_entities(
            [
                principal.entity(principal_uid.clone())?,
                service.entity(service_uid.clone())?,
            ],
            Some(schema),
        )
        .map_err(|e| format!("entities do not fit the schema: {e}"))?;
        let context = request::context(&request.context, ContextUse::ALL)?;
        let cedar_request = cedar_policy::Request::new(
            principal_uid,
            self.names.action(action).clone(),
            service_uid,
            context,
            Some(schema),
        )
        .map_err(|e| format!("request does not fit the schema: {e}"))?;
        let response =
            cedar_policy::Authorizer::new().is_authorized(&cedar_request, &all, &entities);
        let mut policies: Vec<String> = response
            .diagnostics()
            .reason()
            .map(ToString::to_string)
            .collect();
        policies.sort_by_key(|id| self.by_id.get(id).copied());
        let errors = response
            .diagnostics()
            .errors()
            .map(ToString::to_string)
            .collect();
        Ok((
            response.decision() == cedar_policy::Decision::Allow,
            policies,
            errors,
        ))
    }

    #[allow(clippy::too_many_arguments)]
    fn audit_reason(
        &self,
        user_reason: &str,
        action: Action,
        request: &AccessRequest,
        prepared: Option<&Prepared>,
        policies: &[&Rendered],
        errors: &[String],
        notes: &[String],
    ) -> String {
        use std::fmt::Write as _;
        let ctx = &request.context;
        let mut out = String::with_capacity(
            384 + user_reason.len()
                + prepared.map_or(0, |p| p.principal_json.len() + p.service.json.len())
                + errors.iter().chain(notes).map(String::len).sum::<usize>()
                + 64 * policies.len(),
        );
        // Rendered once per pair when the decision got that far.
        let (identifier, principal_attrs, service_attrs) = match prepared {
            Some(p) => (
                Cow::Borrowed(p.identifier.as_str()),
                Cow::Borrowed(p.principal_json.as_str()),
                Cow::Borrowed(p.service.json.as_str()),
            ),
            None => (
                Cow::Owned(request.principal.identifier.to_string()),
                Cow::Owned(json(&request.principal.attrs)),
                Cow::Owned(json(&request.service.attrs)),
            ),
        };
        let _ = write!(
            out,
            "{user_reason}; principal {identifier} attrs {principal_attrs}; service {} attrs \
             {service_attrs}; context time={}",
            request.service.name, ctx.time
        );
        if let Some(ip) = ctx.source_ip {
            let _ = write!(out, " source_ip={ip} (relay-asserted)");
        }
        if let Some(relay) = &ctx.relay {
            let _ = write!(out, " relay={relay}");
        }
        if let Some(exp) = ctx.credential_expires {
            let _ = write!(out, " credential_expires={exp}");
        }
        let _ = write!(out, "; action {action}");
        if !policies.is_empty() {
            let _ = write!(
                out,
                "; determined by {}",
                join(policies.iter().map(|r| r.placed.as_str()))
            );
        }
        if !errors.is_empty() {
            let _ = write!(out, "; errors: {}", json(errors));
        }
        if !notes.is_empty() {
            let _ = write!(out, "; notes: {}", json(notes));
        }
        let _ = write!(out, "; policy set {}", &self.digest[..16]);
        out
    }
}

/// Where per-action arrays keep `action`.
fn action_index(action: Action) -> usize {
    match action {
        Action::Connect => 0,
        Action::Register => 1,
    }
}

/// The request as the pre-filter sees it.
fn target<'a>(
    action: Action,
    request: &'a AccessRequest,
    identifier: &'a str,
    principal: &'a View<'a>,
    service: &'a View<'a>,
) -> Target<'a> {
    Target {
        principal: (request::IDENTITY_TYPE, identifier),
        action: action.as_str(),
        resource: (request::SERVICE_TYPE, request.service.name.as_str()),
        principal_view: principal,
        resource_view: service,
    }
}

/// `parts` separated by ", ".
fn join<'a>(parts: impl Iterator<Item = &'a str>) -> String {
    let mut out = String::new();
    for (n, part) in parts.enumerate() {
        if n > 0 {
            out.push_str(", ");
        }
        out.push_str(part);
    }
    out
}

/// A policy as decision reasons name it, written once at load.
#[derive(Debug)]
struct Rendered {
    /// Its id.
    id: String,
    /// Its id quoted (as the requesting user sees it).
    quoted: String,
    /// Effect, quoted id and place (as the audit record has it).
    placed: String,
}

impl Rendered {
    fn new(info: &PolicyInfo) -> Self {
        let quoted = format!("{:?}", info.id);
        Rendered {
            id: info.id.clone(),
            placed: format!("{} {quoted} ({}:{})", info.effect, info.file, info.line),
            quoted,
        }
    }
}

/// JSON rendering of values in reasons: quotes and escapes every string, so
/// odd characters in attribute values cannot forge log structure.
fn json<T: Serialize + ?Sized>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "\"<unprintable>\"".into())
}

/// What [`validate`] found: the policies and any warnings.
#[derive(Debug, Clone)]
pub struct ValidateReport {
    /// Files read.
    pub files: usize,
    /// The policies, in file order.
    pub policies: Vec<PolicyInfo>,
    /// Validator warnings (the policies are accepted regardless).
    pub warnings: Vec<Diagnostic>,
    /// SHA-256 of the policy files, as [`PolicyEngine::digest`].
    pub digest: String,
}

impl fmt::Display for ValidateReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let permits = self
            .policies
            .iter()
            .filter(|p| p.effect == PolicyEffect::Permit)
            .count();
        for p in &self.policies {
            writeln!(
                f,
                "  {:<6} {:?} ({}:{})",
                p.effect.to_string(),
                p.id,
                p.file,
                p.line
            )?;
        }
        for w in &self.warnings {
            writeln!(f, "{w}\n")?;
        }
        write!(
            f,
            "ok: {} file{}, {} polic{} ({permits} permit, {} forbid), {} warning{}",
            self.files,
            if self.files == 1 { "" } else { "s" },
            self.policies.len(),
            if self.policies.len() == 1 { "y" } else { "ies" },
            self.policies.len() - permits,
            self.warnings.len(),
            if self.warnings.len() == 1 { "" } else { "s" },
        )?;
        if self.policies.is_empty() {
            write!(
                f,
                "\nno policies: a node using them admits nobody (default deny)"
            )?;
        }
        Ok(())
    }
}

impl ValidateReport {
    /// The report for a loaded engine.
    pub fn of(engine: &PolicyEngine) -> Self {
        ValidateReport {
            files: engine.files,
            policies: engine.infos.clone(),
            warnings: engine.warnings.clone(),
            digest: engine.digest.clone(),
        }
    }
}

/// Checks the policy files of `dir`: syntax, schema and limits
/// (`postern policy validate DIR`). Problems come back as
/// [`PolicyError::Invalid`], whose `Display` lists every diagnostic with its
/// file, line and column.
pub fn validate(dir: &Path) -> Result<ValidateReport, PolicyError> {
    PolicyEngine::from_dir(dir).map(|engine| ValidateReport::of(&engine))
}

#[cfg(test)]
#[path = "engine_tests.rs"]
mod tests;
