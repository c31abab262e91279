//! Structural checks: walk the YAML node tree against the model's own JSON Schema.
//!
//! Driving the walk by the schemars schema keeps one source of truth (the serde model) while
//! reporting *every* unknown key, wrong type and unsupported value with its position — serde
//! would stop at the first. The walk also produces the JSON value that serde then turns into
//! the model, with both `additionalFiles` syntaxes and both `extraCommandLine` syntaxes
//! normalized to lists, and records where each normalized entry came from.

use std::collections::HashMap;

use serde_json::{Map, Value};

use super::load::{join_key, resolve_scalar, Node, NodeKind, Position, Resolved};

/// Where a model path (e.g. `os.additionalFiles[2].source`) came from in the file.
#[derive(Debug, Clone, PartialEq)]
pub struct Origin {
    /// The key path as the user wrote it (differs for normalized map-form entries).
    pub display: String,
    /// Position of the key naming this value, when it has one.
    pub key: Option<Position>,
    /// Position of the value.
    pub value: Position,
}

/// Model key paths → positions in the file.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SourceMap {
    origins: HashMap<String, Origin>,
}

impl SourceMap {
    fn record(&mut self, path: &str, origin: Origin) {
        self.origins.entry(path.to_owned()).or_insert(origin);
    }

    /// Whether the file set this path explicitly.
    pub fn contains(&self, path: &str) -> bool {
        self.origins.contains_key(path)
    }

    /// The written path and position of a model path: the value's position, or for a path the
    /// file does not contain (a missing field), its nearest written ancestor's.
    pub fn locate(&self, path: &str) -> (String, Position) {
        self.find(path, false)
    }

    /// Like [`SourceMap::locate`] but points at the key naming the value when there is one.
    pub fn locate_key(&self, path: &str) -> (String, Position) {
        self.find(path, true)
    }

    fn find(&self, path: &str, prefer_key: bool) -> (String, Position) {
        let mut prefix = path;
        loop {
            if let Some(origin) = self.origins.get(prefix) {
                let suffix = &path[prefix.len()..];
                let position = match (prefer_key, origin.key) {
                    (true, Some(key)) => key,
                    _ => origin.value,
                };
                return (format!("{}{suffix}", origin.display), position);
            }
            match parent(prefix) {
                Some(parent) => prefix = parent,
                None => return (path.to_owned(), Position { line: 1, column: 1 }),
            }
        }
    }
}

/// The parent of a key path: `a.b[2]` → `a.b` → `a` → none.
fn parent(path: &str) -> Option<&str> {
    if path.is_empty() {
        return None;
    }
    if path.ends_with(']') {
        return path.rfind('[').map(|index| &path[..index]);
    }
    Some(path.rfind('.').map_or("", |index| &path[..index]))
}

/// A structural problem at a written key path.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    pub path: String,
    pub position: Position,
    pub message: String,
}

/// Walks nodes against a schema; see the module docs.
pub struct Walker<'schema> {
    root: &'schema Value,
    pub problems: Vec<Problem>,
    pub sources: SourceMap,
}

/// JSON Schema types a node can satisfy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Null,
    Boolean,
    Integer,
    Number,
    String,
    Array,
    Object,
}

impl Kind {
    fn from_name(name: &str) -> Option<Kind> {
        Some(match name {
            "null" => Kind::Null,
            "boolean" => Kind::Boolean,
            "integer" => Kind::Integer,
            "number" => Kind::Number,
            "string" => Kind::String,
            "array" => Kind::Array,
            "object" => Kind::Object,
            _ => return None,
        })
    }

    fn describe(self) -> &'static str {
        match self {
            Kind::Null => "nothing",
            Kind::Boolean => "a boolean",
            Kind::Integer => "an integer",
            Kind::Number => "a number",
            Kind::String => "a string",
            Kind::Array => "a list",
            Kind::Object => "a mapping",
        }
    }

    /// Whether a node can be read as this kind. Numbers are accepted where a string is expected
    /// (`permissions: 0644`, a numeric host name) and read as written; booleans and empty
    /// values are not, since they are almost always a mistake there.
    fn accepts(self, node: &Node) -> bool {
        match (&node.kind, self) {
            (NodeKind::Sequence(_), Kind::Array) | (NodeKind::Mapping(_), Kind::Object) => true,
            (NodeKind::Scalar { text, plain }, kind) => {
                matches!(
                    (resolve_scalar(text, *plain), kind),
                    (Resolved::Null, Kind::Null)
                        | (Resolved::Bool(_), Kind::Boolean)
                        | (
                            Resolved::Integer(_),
                            Kind::Integer | Kind::Number | Kind::String
                        )
                        | (Resolved::Float(_), Kind::Number | Kind::String)
                        | (Resolved::String, Kind::String)
                )
            }
            _ => false,
        }
    }

    /// How well a node matches: exact kinds beat numbers read as strings.
    fn exact(self, node: &Node) -> bool {
        match &node.kind {
            NodeKind::Scalar { text, plain } => !matches!(
                (resolve_scalar(text, *plain), self),
                (Resolved::Integer(_) | Resolved::Float(_), Kind::String)
            ),
            _ => true,
        }
    }
}

impl<'schema> Walker<'schema> {
    pub fn new(root: &'schema Value) -> Walker<'schema> {
        Walker {
            root,
            problems: Vec::new(),
            sources: SourceMap::default(),
        }
    }

    fn problem(&mut self, path: &str, position: Position, message: impl Into<String>) {
        self.problems.push(Problem {
            path: path.to_owned(),
            position,
            message: message.into(),
        });
    }

    /// Follow `$ref`s to the schema that says something.
    fn resolve(&self, mut schema: &'schema Value) -> (&'schema Value, Option<&'schema str>) {
        let mut name = None;
        for _ in 0..32 {
            let Some(reference) = schema.get("$ref").and_then(Value::as_str) else {
                break;
            };
            let Some(def) = reference.strip_prefix("#/$defs/") else {
                break;
            };
            name = Some(def);
            match self.root.get("$defs").and_then(|defs| defs.get(def)) {
                Some(target) => schema = target,
                None => break,
            }
        }
        (schema, name)
    }

    /// The kinds a schema can accept, looking through references and alternatives.
    fn kinds(&self, schema: &'schema Value) -> Vec<Kind> {
        let (schema, _) = self.resolve(schema);
        if let Some(branches) = alternatives(schema) {
            return branches
                .iter()
                .flat_map(|branch| self.kinds(branch))
                .collect();
        }
        match schema.get("type") {
            Some(Value::String(name)) => Kind::from_name(name).into_iter().collect(),
            Some(Value::Array(names)) => names
                .iter()
                .filter_map(|name| name.as_str().and_then(Kind::from_name))
                .collect(),
            _ => Vec::new(),
        }
    }

    /// Check `node` against `schema`, recording problems and origins; returns the JSON value
    /// for serde, or `None` when the node has problems.
    ///
    /// `path` is the model path (used for the source map), `display` the path as written.
    pub fn walk(
        &mut self,
        node: &Node,
        schema: &'schema Value,
        path: &str,
        display: &str,
    ) -> Option<Value> {
        let (schema, name) = self.resolve(schema);
        if schema == &Value::Bool(true) || schema.as_object().is_some_and(Map::is_empty) {
            return Some(plain_value(node));
        }
        if let Some(branches) = alternatives(schema) {
            return self.walk_alternatives(node, branches, path, display, name);
        }
        let kinds = self.kinds(schema);
        let Some(kind) = kinds.iter().copied().find(|kind| kind.accepts(node)) else {
            if kinds.is_empty() {
                return Some(plain_value(node));
            }
            let expected = describe_kinds(&kinds);
            self.problem(
                display,
                node.position,
                format!("expected {expected}, found {}", node.kind.describe()),
            );
            return None;
        };
        match (&node.kind, kind) {
            (NodeKind::Mapping(entries), Kind::Object) => {
                self.walk_object(node, entries, schema, path, display)
            }
            (NodeKind::Sequence(items), Kind::Array) => {
                let item_schema = schema.get("items").unwrap_or(&Value::Bool(true));
                let mut values = Vec::new();
                let mut ok = true;
                for (index, item) in items.iter().enumerate() {
                    let item_path = format!("{path}[{index}]");
                    let item_display = format!("{display}[{index}]");
                    self.sources.record(
                        &item_path,
                        Origin {
                            display: item_display.clone(),
                            key: None,
                            value: item.position,
                        },
                    );
                    match self.walk(item, item_schema, &item_path, &item_display) {
                        Some(value) => values.push(value),
                        None => ok = false,
                    }
                }
                ok.then_some(Value::Array(values))
            }
            (NodeKind::Scalar { text, plain }, kind) => {
                self.walk_scalar(node, text, *plain, kind, schema, display)
            }
            _ => None,
        }
    }

    fn walk_scalar(
        &mut self,
        node: &Node,
        text: &str,
        plain: bool,
        kind: Kind,
        schema: &'schema Value,
        display: &str,
    ) -> Option<Value> {
        let value = match (kind, resolve_scalar(text, plain)) {
            (Kind::Null, _) => Value::Null,
            (Kind::Boolean, Resolved::Bool(value)) => Value::Bool(value),
            (Kind::Integer, Resolved::Integer(value)) => {
                let minimum = schema.get("minimum").and_then(Value::as_i64);
                let maximum = match schema.get("format").and_then(Value::as_str) {
                    Some("uint32") => Some(i64::from(u32::MAX)),
                    _ => None,
                };
                if minimum.is_some_and(|minimum| value < minimum)
                    || maximum.is_some_and(|maximum| value > maximum)
                {
                    self.problem(
                        display,
                        node.position,
                        format!(
                            "{value} is out of range; allowed: {} to {}",
                            minimum.unwrap_or(i64::MIN),
                            maximum.unwrap_or(i64::MAX)
                        ),
                    );
                    return None;
                }
                Value::from(value)
            }
            (Kind::Number, Resolved::Integer(value)) => Value::from(value),
            (Kind::Number, Resolved::Float(value)) => Value::from(value),
            _ => Value::String(text.to_owned()),
        };
        let allowed: Vec<&Value> = match (schema.get("enum"), schema.get("const")) {
            (Some(Value::Array(values)), _) => values.iter().collect(),
            (_, Some(value)) => vec![value],
            _ => Vec::new(),
        };
        if !allowed.is_empty() && !allowed.contains(&&value) {
            let names: Vec<String> = allowed
                .iter()
                .map(|value| value.as_str().map_or(value.to_string(), str::to_owned))
                .collect();
            self.problem(
                display,
                node.position,
                format!("unsupported value {text:?}; allowed: {}", names.join(", ")),
            );
            return None;
        }
        Some(value)
    }

    fn walk_object(
        &mut self,
        node: &Node,
        entries: &[(super::load::Key, Node)],
        schema: &'schema Value,
        path: &str,
        display: &str,
    ) -> Option<Value> {
        let properties = schema.get("properties").and_then(Value::as_object);
        let additional = schema.get("additionalProperties");
        let mut object = Map::new();
        for (key, value) in entries {
            let key_path = join_key(path, &key.text);
            let key_display = join_key(display, &key.text);
            let value_schema = match properties.and_then(|properties| properties.get(&key.text)) {
                Some(schema) => schema,
                None => match additional {
                    Some(Value::Bool(false)) => {
                        let allowed: Vec<&str> = properties
                            .map(|properties| properties.keys().map(String::as_str).collect())
                            .unwrap_or_default();
                        self.problem(
                            &key_display,
                            key.position,
                            format!("unknown key; allowed here: {}", allowed.join(", ")),
                        );
                        continue;
                    }
                    Some(schema) => schema,
                    None => &Value::Bool(true),
                },
            };
            self.sources.record(
                &key_path,
                Origin {
                    display: key_display.clone(),
                    key: Some(key.position),
                    value: value.position,
                },
            );
            if let Some(value) = self.walk(value, value_schema, &key_path, &key_display) {
                object.insert(key.text.clone(), value);
            }
        }
        if let Some(required) = schema.get("required").and_then(Value::as_array) {
            for name in required.iter().filter_map(Value::as_str) {
                if !entries.iter().any(|(key, _)| key.text == name) {
                    self.problem(
                        &join_key(display, name),
                        node.position,
                        "missing required key",
                    );
                    return None;
                }
            }
        }
        // Fields with problems are left out (every field is optional) so the rest of the file
        // can still be checked by the semantic rules.
        Some(Value::Object(object))
    }

    fn walk_alternatives(
        &mut self,
        node: &Node,
        branches: &'schema [Value],
        path: &str,
        display: &str,
        name: Option<&str>,
    ) -> Option<Value> {
        let candidates: Vec<&Value> = branches
            .iter()
            .filter(|branch| self.kinds(branch).iter().any(|kind| kind.accepts(node)))
            .collect();
        let exact: Vec<&Value> = candidates
            .iter()
            .copied()
            .filter(|branch| {
                self.kinds(branch)
                    .iter()
                    .any(|kind| kind.accepts(node) && kind.exact(node))
            })
            .collect();
        let candidates = if exact.is_empty() { candidates } else { exact };
        let Some(first) = candidates.first() else {
            let kinds: Vec<Kind> = branches
                .iter()
                .flat_map(|branch| self.kinds(branch))
                .collect();
            self.problem(
                display,
                node.position,
                format!(
                    "expected {}, found {}",
                    describe_kinds(&kinds),
                    node.kind.describe()
                ),
            );
            return None;
        };
        // Several branches take this kind of node: the first that fits without problems wins,
        // else the first one's problems are reported.
        let mut chosen = None;
        for candidate in &candidates {
            let mut trial = Walker::new(self.root);
            if let Some(value) = trial.walk(node, candidate, path, display) {
                if trial.problems.is_empty() {
                    chosen = Some((trial, value));
                    break;
                }
            }
        }
        let value = match chosen {
            Some((trial, value)) => {
                for (key, origin) in trial.sources.origins {
                    self.sources.origins.entry(key).or_insert(origin);
                }
                value
            }
            None => self.walk(node, first, path, display)?,
        };
        Some(match name {
            Some("KernelArgs") => self.normalize_kernel_args(node, value, path, display),
            Some("AdditionalFiles") => self.normalize_files(node, value, path, display),
            _ => value,
        })
    }

    /// A kernel command line string becomes a list of arguments; each points at the string.
    fn normalize_kernel_args(
        &mut self,
        node: &Node,
        value: Value,
        path: &str,
        display: &str,
    ) -> Value {
        let Value::String(line) = value else {
            return value;
        };
        let args = super::model::split_kernel_args(&line);
        for index in 0..args.len().max(1) {
            self.sources.record(
                &format!("{path}[{index}]"),
                Origin {
                    display: display.to_owned(),
                    key: None,
                    value: node.position,
                },
            );
        }
        if args.is_empty() {
            // Keep one empty argument so validation reports the empty string.
            return Value::Array(vec![Value::String(String::new())]);
        }
        Value::Array(args.into_iter().map(Value::String).collect())
    }

    /// The map form becomes the list form, in file order; each entry's fields point at the
    /// key (the source) or the destination as written.
    fn normalize_files(&mut self, node: &Node, value: Value, path: &str, display: &str) -> Value {
        let (NodeKind::Mapping(entries), Value::Object(object)) = (&node.kind, &value) else {
            return value;
        };
        let mut files = Vec::new();
        for (key, destinations) in entries {
            let Some(written) = object.get(&key.text) else {
                continue;
            };
            let key_display = join_key(display, &key.text);
            let (items, nodes): (Vec<&Value>, Vec<(&Node, String)>) =
                match (written, &destinations.kind) {
                    (Value::Array(items), NodeKind::Sequence(nodes)) => (
                        items.iter().collect(),
                        nodes
                            .iter()
                            .enumerate()
                            .map(|(index, node)| (node, format!("{key_display}[{index}]")))
                            .collect(),
                    ),
                    _ => (vec![written], vec![(destinations, key_display.clone())]),
                };
            for (item, (item_node, item_display)) in items.into_iter().zip(nodes) {
                let index = files.len();
                let file_path = format!("{path}[{index}]");
                let at_key = Origin {
                    display: key_display.clone(),
                    key: Some(key.position),
                    value: key.position,
                };
                self.sources.record(&file_path, at_key.clone());
                self.sources.record(&format!("{file_path}.source"), at_key);
                let mut file = Map::new();
                file.insert("source".to_owned(), Value::String(key.text.clone()));
                match item {
                    Value::Object(config) => {
                        let fields = match &item_node.kind {
                            NodeKind::Mapping(fields) => fields.as_slice(),
                            _ => &[],
                        };
                        for (name, field) in config {
                            let target = if name == "path" { "destination" } else { name };
                            file.insert(target.to_owned(), field.clone());
                            if let Some((field_key, field_node)) =
                                fields.iter().find(|(field_key, _)| field_key.text == *name)
                            {
                                self.sources.record(
                                    &format!("{file_path}.{target}"),
                                    Origin {
                                        display: join_key(&item_display, name),
                                        key: Some(field_key.position),
                                        value: field_node.position,
                                    },
                                );
                            }
                        }
                    }
                    destination => {
                        file.insert("destination".to_owned(), destination.clone());
                        self.sources.record(
                            &format!("{file_path}.destination"),
                            Origin {
                                display: item_display.clone(),
                                key: Some(key.position),
                                value: item_node.position,
                            },
                        );
                    }
                }
                files.push(Value::Object(file));
            }
        }
        Value::Array(files)
    }
}

fn alternatives(schema: &Value) -> Option<&[Value]> {
    schema
        .get("anyOf")
        .or_else(|| schema.get("oneOf"))
        .and_then(Value::as_array)
        .map(Vec::as_slice)
}

fn describe_kinds(kinds: &[Kind]) -> String {
    let mut names: Vec<&str> = Vec::new();
    for kind in kinds {
        // An optional field's `null` is not worth suggesting.
        if *kind != Kind::Null && !names.contains(&kind.describe()) {
            names.push(kind.describe());
        }
    }
    if names.is_empty() {
        return "nothing".to_owned();
    }
    match names.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        _ => names.join(""),
    }
}

/// A node as JSON without a schema to guide it (for free-form values).
fn plain_value(node: &Node) -> Value {
    match &node.kind {
        NodeKind::Scalar { text, plain } => match resolve_scalar(text, *plain) {
            Resolved::Null => Value::Null,
            Resolved::Bool(value) => Value::Bool(value),
            Resolved::Integer(value) => Value::from(value),
            Resolved::Float(value) => Value::from(value),
            Resolved::String => Value::String(text.clone()),
        },
        NodeKind::Sequence(items) => Value::Array(items.iter().map(plain_value).collect()),
        NodeKind::Mapping(entries) => Value::Object(
            entries
                .iter()
                .map(|(key, value)| (key.text.clone(), plain_value(value)))
                .collect(),
        ),
    }
}
