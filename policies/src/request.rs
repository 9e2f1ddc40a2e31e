//! What a decision is about: who ([`Principal`]), what ([`Action`] on a
//! [`Service`]) and in which circumstances ([`RequestContext`]), and their
//! translation into Cedar entities and context.
//!
//! Values are handed to Cedar as typed values through its entity API, never
//! spliced into Cedar source text, so attribute values with quotes, newlines
//! or any other characters cannot change the meaning of a policy.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use cedar_policy::{EntityId, EntityTypeName, EntityUid, RestrictedExpression};
use cedar_policy_core::ast::{self, Literal, PartialValue, Value};
use postern_identity::wire::ServiceName;
use postern_identity::{AttrValue, Attributes, Identifier};
use serde::{Deserialize, Serialize};
use smol_str::SmolStr;

use crate::time;

/// What the principal wants to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Open a tunnel to a service (`Action::"connect"`).
    Connect,
    /// Register (serve) a service name at a relay (`Action::"register"`).
    Register,
}

impl Action {
    /// The Cedar action id: `connect` or `register`.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Connect => "connect",
            Action::Register => "register",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a text is not an [`Action`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an action: use \"connect\" or \"register\"")]
pub struct BadAction(pub String);

impl FromStr for Action {
    type Err = BadAction;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "connect" => Ok(Action::Connect),
            "register" => Ok(Action::Register),
            other => Err(BadAction(other.chars().take(40).collect())),
        }
    }
}

/// The identity asking: its identifier, proven by the handshake, and the
/// attributes its verified credentials vouch for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The identifier proven during the handshake.
    pub identifier: Identifier,
    /// Attributes from verified credentials (empty without a credential).
    pub attrs: Attributes,
}

impl Principal {
    /// A principal with no attributes.
    pub fn new(identifier: Identifier) -> Self {
        Principal {
            identifier,
            attrs: Attributes::new(),
        }
    }

    /// Adds (or replaces) one attribute.
    pub fn with_attr(mut self, name: impl Into<String>, value: AttrValue) -> Self {
        self.attrs.insert(name.into(), value);
        self
    }
}

/// The service asked for: its name and the attributes its outlet declares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    /// The service name (the Cedar entity id: `Service::"db-prod"`).
    pub name: ServiceName,
    /// Attributes declared in the outlet's configuration.
    pub attrs: Attributes,
}

impl Service {
    /// A service with no attributes.
    pub fn new(name: ServiceName) -> Self {
        Service {
            name,
            attrs: Attributes::new(),
        }
    }

    /// Adds (or replaces) one attribute.
    pub fn with_attr(mut self, name: impl Into<String>, value: AttrValue) -> Self {
        self.attrs.insert(name.into(), value);
        self
    }

    /// A service whose attributes are single strings, as an outlet's
    /// configuration declares them (`env = "prod"`).
    pub fn with_string_attrs(name: ServiceName, attrs: &BTreeMap<String, String>) -> Self {
        Service {
            name,
            attrs: attrs
                .iter()
                .map(|(k, v)| (k.clone(), AttrValue::One(v.clone())))
                .collect(),
        }
    }
}

/// The circumstances of a request, as the deciding node knows them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestContext {
    /// Decision time, Unix seconds, from the deciding node's clock
    /// (`context.time`; also `now`, `hour_utc` and `weekday`).
    pub time: u64,
    /// The address the relay saw the requester connect from
    /// (`context.source_ip`). **Relay-asserted**: the deciding node cannot
    /// check it. `None` when not known.
    pub source_ip: Option<IpAddr>,
    /// The relay the request came through (`context.relay`), when known.
    pub relay: Option<Identifier>,
    /// When the principal's credential expires, Unix seconds
    /// (`context.credential_expires`); `None` without a credential.
    pub credential_expires: Option<u64>,
}

impl RequestContext {
    /// A context at Unix time `time` with nothing else known.
    pub fn at(time: u64) -> Self {
        RequestContext {
            time,
            source_ip: None,
            relay: None,
            credential_expires: None,
        }
    }
}

/// Everything one decision is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessRequest {
    /// Who asks.
    pub principal: Principal,
    /// For which service.
    pub service: Service,
    /// In which circumstances.
    pub context: RequestContext,
}

/// The principal entity type.
pub(crate) const IDENTITY_TYPE: &str = "Identity";
/// The resource entity type.
pub(crate) const SERVICE_TYPE: &str = "Service";

/// Principal attributes declared in the schema with type `String`.
const IDENTITY_STRINGS: &[&str] = &["team", "role", "name", "email"];
/// Principal attributes declared in the schema with type `Set<String>`.
const IDENTITY_SETS: &[&str] = &["groups"];
/// The principal attribute Postern sets itself.
const IDENTITY_RESERVED: &str = "identifier";
/// Service attributes declared in the schema with type `String`.
const SERVICE_STRINGS: &[&str] = &["env", "team", "owner", "tier", "region"];
/// The service attribute Postern sets itself.
const SERVICE_RESERVED: &str = "name";

/// Entity type names, parsed once per engine.
#[derive(Debug, Clone)]
pub(crate) struct Names {
    identity: EntityTypeName,
    service: EntityTypeName,
    connect: EntityUid,
    register: EntityUid,
}

impl Names {
    pub(crate) fn new() -> Result<Self, String> {
        let ty = |s: &str| EntityTypeName::from_str(s).map_err(|e| e.to_string());
        let action = ty("Action")?;
        Ok(Names {
            identity: ty(IDENTITY_TYPE)?,
            service: ty(SERVICE_TYPE)?,
            connect: EntityUid::from_type_name_and_id(action.clone(), EntityId::new("connect")),
            register: EntityUid::from_type_name_and_id(action, EntityId::new("register")),
        })
    }

    pub(crate) fn action(&self, action: Action) -> &EntityUid {
        match action {
            Action::Connect => &self.connect,
            Action::Register => &self.register,
        }
    }

    /// `Identity::"<identifier>"`, from the identifier as text.
    pub(crate) fn principal_uid(&self, id: &str) -> EntityUid {
        EntityUid::from_type_name_and_id(self.identity.clone(), EntityId::new(id))
    }

    pub(crate) fn service_uid(&self, name: &ServiceName) -> EntityUid {
        EntityUid::from_type_name_and_id(self.service.clone(), EntityId::new(name.as_str()))
    }
}

fn string(v: &str) -> RestrictedExpression {
    RestrictedExpression::new_string(v.to_owned())
}

#[cfg(test)]
fn string_set<'a>(values: impl IntoIterator<Item = &'a str>) -> RestrictedExpression {
    RestrictedExpression::new_set(values.into_iter().map(string))
}

/// The attribute names and tag keys the loaded policies can read. Cedar has
/// no way to list an entity's attributes or tags, so the others are left out
/// of the entities: they cannot change a decision, and credentials may carry
/// many (long group lists, each also a tag).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Referenced {
    attrs: BTreeSet<String>,
    tags: BTreeSet<String>,
    all_attrs: bool,
    all_tags: bool,
}

impl Referenced {
    /// Every attribute and tag.
    pub(crate) fn all() -> Self {
        Referenced {
            all_attrs: true,
            all_tags: true,
            ..Referenced::default()
        }
    }

    /// Nothing.
    pub(crate) fn none() -> Self {
        Referenced::default()
    }

    /// Marks attribute `name` as read.
    pub(crate) fn attr(&mut self, name: &str) {
        if !self.all_attrs {
            self.attrs.insert(name.to_owned());
        }
    }

    /// Marks tag `key` as read.
    pub(crate) fn tag(&mut self, key: &str) {
        if !self.all_tags {
            self.tags.insert(key.to_owned());
        }
    }

    /// Marks every tag as read.
    pub(crate) fn all_tags(&mut self) {
        self.all_tags = true;
        self.tags.clear();
    }

    /// What either reads.
    pub(crate) fn union(mut self, other: Referenced) -> Referenced {
        self.all_attrs |= other.all_attrs;
        self.all_tags |= other.all_tags;
        if self.all_attrs {
            self.attrs.clear();
        } else {
            self.attrs.extend(other.attrs);
        }
        if self.all_tags {
            self.tags.clear();
        } else {
            self.tags.extend(other.tags);
        }
        self
    }

    pub(crate) fn has_attr(&self, name: &str) -> bool {
        self.all_attrs || self.attrs.contains(name)
    }

    pub(crate) fn has_tag(&self, key: &str) -> bool {
        self.all_tags || self.tags.contains(key)
    }
}

/// Attribute names the schema declares, on either entity type (and the
/// reserved ones): [`View::attr_at`] finds them by position in this list,
/// without comparing names.
const SLOTTED: [&str; 10] = [
    "identifier",
    "team",
    "role",
    "groups",
    "name",
    "email",
    "env",
    "owner",
    "tier",
    "region",
];

/// Where no attribute is, in [`View`]'s slots.
const EMPTY_SLOT: u8 = u8::MAX;
/// The reserved attribute, in [`View`]'s slots.
const RESERVED_SLOT: u8 = u8::MAX - 1;

/// An attribute name with its position in [`SLOTTED`], when it has one.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct AttrName {
    pub(crate) name: String,
    slot: Option<u8>,
}

impl AttrName {
    pub(crate) fn new(name: &str) -> Self {
        AttrName {
            slot: slot_of(name),
            name: name.to_owned(),
        }
    }
}

impl From<&str> for AttrName {
    fn from(name: &str) -> Self {
        AttrName::new(name)
    }
}

fn slot_of(name: &str) -> Option<u8> {
    SLOTTED
        .iter()
        .position(|n| *n == name)
        .and_then(|i| u8::try_from(i).ok())
}

/// A declared attribute's value as the entity will hold it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Declared<'a> {
    /// A `String` attribute.
    Str(&'a str),
    /// A `Set<String>` attribute.
    Set(Vec<&'a str>),
}

impl Declared<'_> {
    fn as_ref(&self) -> AttrRef<'_> {
        match self {
            Declared::Str(s) => AttrRef::Str(s),
            Declared::Set(vs) => AttrRef::Set(vs),
        }
    }
}

/// A borrowed attribute value ([`View::attr`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AttrRef<'b> {
    /// A `String` attribute.
    Str(&'b str),
    /// A `Set<String>` attribute.
    Set(&'b [&'b str]),
}

/// What an entity will look like to policies: its declared attributes (as
/// the schema types them) and its tags. The entity built for Cedar and the
/// pre-filter both read this one translation, so they cannot disagree.
#[derive(Debug)]
pub(crate) struct View<'a> {
    /// The attribute Postern sets itself (`identifier` or `name`) and its value.
    reserved: (&'static str, String),
    /// Declared attributes that are present.
    declared: Vec<(&'a str, Declared<'a>)>,
    /// For each name of [`SLOTTED`]: where in `declared` it is, or
    /// [`RESERVED_SLOT`] or [`EMPTY_SLOT`].
    slots: [u8; SLOTTED.len()],
    /// All attributes but the reserved one, each a tag holding a set.
    source: &'a Attributes,
}

impl<'a> View<'a> {
    /// Translates `attrs`, noting what could not be translated.
    fn new(
        what: &str,
        attrs: &'a Attributes,
        strings: &[&str],
        sets: &[&str],
        reserved: (&'static str, String),
        notes: &mut Vec<String>,
    ) -> Self {
        let mut declared = Vec::new();
        for (name, value) in attrs {
            if name == reserved.0 {
                notes.push(format!(
                    "{what} attribute {name:?} ignored: Postern sets `{}` itself",
                    reserved.0
                ));
            } else if strings.contains(&name.as_str()) {
                match value {
                    AttrValue::One(v) => declared.push((name.as_str(), Declared::Str(v))),
                    AttrValue::Many(vs) if vs.len() == 1 => {
                        declared.push((name.as_str(), Declared::Str(&vs[0])));
                    }
                    AttrValue::Many(vs) => notes.push(format!(
                        "{what} attribute {name:?} has {} values where the schema expects one; \
                         left unset (still available as tag {name:?})",
                        vs.len()
                    )),
                }
            } else if sets.contains(&name.as_str()) {
                declared.push((name.as_str(), Declared::Set(value.values().collect())));
            }
        }
        let mut slots = [EMPTY_SLOT; SLOTTED.len()];
        for (position, (name, _)) in declared.iter().enumerate() {
            if let (Some(slot), Ok(position)) = (slot_of(name), u8::try_from(position)) {
                if position < RESERVED_SLOT {
                    slots[usize::from(slot)] = position;
                }
            }
        }
        if let Some(slot) = slot_of(reserved.0) {
            slots[usize::from(slot)] = RESERVED_SLOT;
        }
        View {
            reserved,
            declared,
            slots,
            source: attrs,
        }
    }

    /// The principal's view; `identifier` is its identifier as text.
    pub(crate) fn principal(
        principal: &'a Principal,
        identifier: String,
        notes: &mut Vec<String>,
    ) -> Self {
        View::new(
            "principal",
            &principal.attrs,
            IDENTITY_STRINGS,
            IDENTITY_SETS,
            (IDENTITY_RESERVED, identifier),
            notes,
        )
    }

    /// The service's view.
    pub(crate) fn service(service: &'a Service, notes: &mut Vec<String>) -> Self {
        View::new(
            "service",
            &service.attrs,
            SERVICE_STRINGS,
            &[],
            (SERVICE_RESERVED, service.name.as_str().to_owned()),
            notes,
        )
    }

    /// The value of attribute `name`, if the entity has it.
    pub(crate) fn attr(&self, name: &str) -> Option<AttrRef<'_>> {
        if name == self.reserved.0 {
            return Some(AttrRef::Str(&self.reserved.1));
        }
        self.declared
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_ref())
    }

    /// [`View::attr`], by slot when the name has one.
    pub(crate) fn attr_at(&self, name: &AttrName) -> Option<AttrRef<'_>> {
        let Some(slot) = name.slot else {
            return self.attr(&name.name);
        };
        match *self.slots.get(usize::from(slot))? {
            EMPTY_SLOT => None,
            RESERVED_SLOT => Some(AttrRef::Str(&self.reserved.1)),
            position => self
                .declared
                .get(usize::from(position))
                .map(|(_, v)| v.as_ref()),
        }
    }

    /// The values of tag `key`, if the entity has it.
    pub(crate) fn tag(&self, key: &str) -> Option<&'a AttrValue> {
        if key == self.reserved.0 {
            return None;
        }
        self.source.get(key)
    }

    /// The entity's attributes: the declared ones present, then the
    /// reserved one.
    fn attrs(&self) -> impl Iterator<Item = (&str, AttrRef<'_>)> {
        self.declared
            .iter()
            .map(|(name, value)| (*name, value.as_ref()))
            .chain(std::iter::once((
                self.reserved.0,
                AttrRef::Str(self.reserved.1.as_str()),
            )))
    }

    /// The entity's tags: every attribute but the reserved one, as a set.
    fn tags(&self) -> impl Iterator<Item = (&'a String, &'a AttrValue)> + '_ {
        self.source
            .iter()
            .filter(|(name, _)| *name != self.reserved.0)
    }

    /// The Cedar entity with this view, built as Cedar values (what the
    /// engine evaluates with), with the attributes and tags `read`.
    pub(crate) fn core_entity(&self, uid: ast::EntityUID, read: &Referenced) -> ast::Entity {
        let str_value = |v: &str| Value::from(v);
        let set_value =
            |vs: &mut dyn Iterator<Item = &str>| Value::set_of_lits(vs.map(Literal::from), None);
        let attrs = self
            .attrs()
            .filter(|(name, _)| read.has_attr(name))
            .map(|(name, value)| {
                let value = match value {
                    AttrRef::Str(v) => str_value(v),
                    AttrRef::Set(vs) => set_value(&mut vs.iter().copied()),
                };
                (SmolStr::from(name), PartialValue::Value(value))
            });
        let tags = self
            .tags()
            .filter(|(name, _)| read.has_tag(name))
            .map(|(name, value)| {
                (
                    SmolStr::from(name.as_str()),
                    PartialValue::Value(set_value(&mut value.values())),
                )
            });
        ast::Entity::new_with_attr_partial_value(uid, attrs, HashSet::new(), HashSet::new(), tags)
    }

    /// The Cedar entity with this view, built through Cedar's public API
    /// from restricted expressions: the reference [`View::core_entity`] must
    /// equal.
    #[cfg(test)]
    pub(crate) fn entity(&self, uid: EntityUid) -> Result<cedar_policy::Entity, String> {
        let attrs: Vec<(String, RestrictedExpression)> = self
            .attrs()
            .map(|(name, value)| {
                let expr = match value {
                    AttrRef::Str(v) => string(v),
                    AttrRef::Set(vs) => string_set(vs.iter().copied()),
                };
                (name.to_owned(), expr)
            })
            .collect();
        let tags = self
            .tags()
            .map(|(name, value)| (name.clone(), string_set(value.values())));
        cedar_policy::Entity::new_with_tags(uid, attrs, [], tags)
            .map_err(|e| format!("entity: {e}"))
    }
}

/// Which context fields a policy (or the candidates of a request) read.
/// Fields no candidate reads are left out of the context: nothing can
/// observe them, and each costs time to build (extension values, `datetime`
/// and `ipaddr`, most; the engine caches those).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ContextUse {
    pub(crate) time: bool,
    pub(crate) now: bool,
    pub(crate) hour_utc: bool,
    pub(crate) weekday: bool,
    pub(crate) source_ip: bool,
    pub(crate) relay: bool,
    pub(crate) credential_expires: bool,
}

impl ContextUse {
    /// Every field.
    pub(crate) const ALL: ContextUse = ContextUse {
        time: true,
        now: true,
        hour_utc: true,
        weekday: true,
        source_ip: true,
        relay: true,
        credential_expires: true,
    };

    /// No field.
    pub(crate) const NONE: ContextUse = ContextUse {
        time: false,
        now: false,
        hour_utc: false,
        weekday: false,
        source_ip: false,
        relay: false,
        credential_expires: false,
    };

    /// Marks field `name` as read; an unknown name marks every field.
    pub(crate) fn mark(&mut self, name: &str) {
        match name {
            "time" => self.time = true,
            "now" => self.now = true,
            "hour_utc" => self.hour_utc = true,
            "weekday" => self.weekday = true,
            "source_ip" => self.source_ip = true,
            "relay" => self.relay = true,
            "credential_expires" => self.credential_expires = true,
            _ => *self = ContextUse::ALL,
        }
    }

    /// Fields read by either.
    pub(crate) fn union(self, o: ContextUse) -> ContextUse {
        ContextUse {
            time: self.time || o.time,
            now: self.now || o.now,
            hour_utc: self.hour_utc || o.hour_utc,
            weekday: self.weekday || o.weekday,
            source_ip: self.source_ip || o.source_ip,
            relay: self.relay || o.relay,
            credential_expires: self.credential_expires || o.credential_expires,
        }
    }
}

/// One context field's value, before it becomes a Cedar value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Field {
    /// A `Long`.
    Long(i64),
    /// A `String`.
    Str(String),
    /// An `ipaddr` extension value.
    Ip(IpAddr),
    /// A `datetime` extension value: RFC 3339 text of this Unix time.
    DateTime(u64),
}

impl Field {
    /// As a Cedar restricted expression (Cedar's public API).
    pub(crate) fn expression(&self) -> RestrictedExpression {
        match self {
            Field::Long(v) => RestrictedExpression::new_long(*v),
            Field::Str(v) => string(v),
            Field::Ip(ip) => RestrictedExpression::new_ip(ip.to_string()),
            Field::DateTime(t) => {
                RestrictedExpression::new_datetime(time::rfc3339(*t).unwrap_or_default())
            }
        }
    }
}

fn long(what: &str, v: u64) -> Result<Field, String> {
    i64::try_from(v)
        .map(Field::Long)
        .map_err(|_| format!("{what} {v} is out of range"))
}

/// The fields of the Cedar context record that `uses` asks for.
pub(crate) fn context_fields(
    ctx: &RequestContext,
    uses: ContextUse,
) -> Result<Vec<(&'static str, Field)>, String> {
    if ctx.time > time::MAX_UNIX_SECONDS {
        return Err(format!(
            "time {} is out of range (after 9999-12-31T23:59:59Z)",
            ctx.time
        ));
    }
    let mut fields = Vec::with_capacity(7);
    if uses.time {
        fields.push(("time", long("time", ctx.time)?));
    }
    if uses.now {
        fields.push(("now", Field::DateTime(ctx.time)));
    }
    if uses.hour_utc {
        fields.push(("hour_utc", long("hour", time::hour_utc(ctx.time))?));
    }
    if uses.weekday {
        fields.push(("weekday", long("weekday", time::iso_weekday(ctx.time))?));
    }
    if let Some(addr) = ctx.source_ip.filter(|_| uses.source_ip) {
        fields.push(("source_ip", Field::Ip(addr)));
    }
    if let Some(relay) = ctx.relay.filter(|_| uses.relay) {
        fields.push(("relay", Field::Str(relay.to_string())));
    }
    if let Some(exp) = ctx.credential_expires.filter(|_| uses.credential_expires) {
        fields.push(("credential_expires", long("credential expiry", exp)?));
    }
    Ok(fields)
}

/// The Cedar context record, through Cedar's public API: the reference the
/// engine's directly built context must equal.
#[cfg(test)]
pub(crate) fn context(
    ctx: &RequestContext,
    uses: ContextUse,
) -> Result<cedar_policy::Context, String> {
    let pairs = context_fields(ctx, uses)?
        .into_iter()
        .map(|(name, field)| (name.to_owned(), field.expression()));
    cedar_policy::Context::from_pairs(pairs).map_err(|e| format!("context: {e}"))
}
