//! Reading a config file into a YAML node tree that remembers where every key and value was.
//!
//! serde alone stops at the first error and forgets positions; this tree lets validation report
//! every problem with its line and column, and catches duplicate keys, which YAML loaders
//! usually resolve silently. JSON is YAML (flow style), so it parses here too.

use std::collections::HashMap;

use serde_saphyr::granit_parser::{Event, Parser, ScalarStyle, Span};

/// A 1-based line and column in the config file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Position {
    pub line: usize,
    pub column: usize,
}

impl Position {
    fn from_span(span: &Span) -> Position {
        Position {
            line: span.start.line(),
            column: span.start.col() + 1,
        }
    }
}

/// One YAML node with its position.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub position: Position,
    pub kind: NodeKind,
}

#[derive(Debug, Clone, PartialEq)]
pub enum NodeKind {
    /// A scalar as written; `plain` scalars are resolved (null, bool, number) by the reader
    /// of the tree, quoted and block scalars are always strings.
    Scalar {
        text: String,
        plain: bool,
    },
    Sequence(Vec<Node>),
    /// Entries in file order; duplicate keys are reported and dropped while loading.
    Mapping(Vec<(Key, Node)>),
}

/// A mapping key (always a string in a config file).
#[derive(Debug, Clone, PartialEq)]
pub struct Key {
    pub text: String,
    pub position: Position,
}

/// A problem found while reading the YAML itself.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadProblem {
    pub position: Position,
    /// Key path of the problem, when known (duplicate keys).
    pub path: Option<String>,
    pub message: String,
}

/// What a YAML plain scalar means under the YAML 1.2 core schema.
#[derive(Debug, Clone, PartialEq)]
pub enum Resolved {
    Null,
    Bool(bool),
    Integer(i64),
    Float(f64),
    String,
}

impl NodeKind {
    /// A short name for messages: "a string", "a list", ...
    pub fn describe(&self) -> &'static str {
        match self {
            NodeKind::Scalar { text, plain } => match resolve_scalar(text, *plain) {
                Resolved::Null => "an empty value",
                Resolved::Bool(_) => "a boolean",
                Resolved::Integer(_) => "an integer",
                Resolved::Float(_) => "a number",
                Resolved::String => "a string",
            },
            NodeKind::Sequence(_) => "a list",
            NodeKind::Mapping(_) => "a mapping",
        }
    }
}

/// Resolve a scalar by the YAML 1.2 core schema, as serde YAML loaders do.
pub fn resolve_scalar(text: &str, plain: bool) -> Resolved {
    if !plain {
        return Resolved::String;
    }
    match text {
        "" | "~" | "null" | "Null" | "NULL" => return Resolved::Null,
        "true" | "True" | "TRUE" => return Resolved::Bool(true),
        "false" | "False" | "FALSE" => return Resolved::Bool(false),
        ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" => {
            return Resolved::Float(f64::INFINITY)
        }
        "-.inf" | "-.Inf" | "-.INF" => return Resolved::Float(f64::NEG_INFINITY),
        ".nan" | ".NaN" | ".NAN" => return Resolved::Float(f64::NAN),
        _ => {}
    }
    let digits = text.strip_prefix(['+', '-']).unwrap_or(text);
    if !digits.is_empty() && digits.bytes().all(|byte| byte.is_ascii_digit()) {
        if let Ok(value) = text.parse::<i64>() {
            return Resolved::Integer(value);
        }
    }
    if let Some(octal) = text.strip_prefix("0o") {
        if let Ok(value) = i64::from_str_radix(octal, 8) {
            return Resolved::Integer(value);
        }
    }
    if let Some(hex) = text.strip_prefix("0x") {
        if let Ok(value) = i64::from_str_radix(hex, 16) {
            return Resolved::Integer(value);
        }
    }
    let looks_numeric = digits.starts_with(|c: char| c.is_ascii_digit() || c == '.')
        && digits
            .bytes()
            .all(|byte| byte.is_ascii_digit() || matches!(byte, b'.' | b'e' | b'E' | b'+' | b'-'));
    if looks_numeric {
        if let Ok(value) = text.parse::<f64>() {
            return Resolved::Float(value);
        }
    }
    Resolved::String
}

/// Parse YAML text into a node tree. The tree is `None` only when the YAML is malformed; problems
/// that leave a usable tree (duplicate keys, non-string keys) come back alongside it.
pub fn parse_yaml(text: &str) -> (Option<Node>, Vec<LoadProblem>) {
    let mut builder = TreeBuilder::default();
    for item in Parser::new_from_str(text) {
        match item {
            Ok((event, span)) => builder.event(event, &span),
            Err(error) => {
                let marker = error.marker();
                builder.problems.push(LoadProblem {
                    position: Position {
                        line: marker.line(),
                        column: marker.col() + 1,
                    },
                    path: None,
                    message: format!("invalid YAML: {}", error.info()),
                });
                return (None, builder.problems);
            }
        }
        if builder.extra_document {
            break;
        }
    }
    let root = builder.root.take().unwrap_or(Node {
        position: Position { line: 1, column: 1 },
        // An empty file is an empty config.
        kind: NodeKind::Mapping(Vec::new()),
    });
    (Some(root), builder.problems)
}

/// Collections being built, innermost last.
enum Open {
    Sequence {
        position: Position,
        anchor: usize,
        items: Vec<Node>,
    },
    Mapping {
        position: Position,
        anchor: usize,
        entries: Vec<(Key, Node)>,
        pending_key: Option<Key>,
        /// Set while the value of a dropped (duplicate or non-string) key is being read.
        skipping: bool,
    },
}

#[derive(Default)]
struct TreeBuilder {
    stack: Vec<Open>,
    anchors: HashMap<usize, Node>,
    root: Option<Node>,
    problems: Vec<LoadProblem>,
    documents: usize,
    extra_document: bool,
}

impl TreeBuilder {
    fn event(&mut self, event: Event<'_>, span: &Span) {
        let position = Position::from_span(span);
        match event {
            Event::DocumentStart(..) => {
                self.documents += 1;
                if self.documents > 1 {
                    self.problems.push(LoadProblem {
                        position,
                        path: None,
                        message: "a config file holds one YAML document; remove the second"
                            .to_owned(),
                    });
                    self.extra_document = true;
                }
            }
            Event::Scalar(text, style, anchor, tag) => {
                // An explicit `!!str` tag makes a plain scalar a string.
                let tagged_string = tag.as_ref().is_some_and(|tag| tag.suffix() == "str");
                let node = Node {
                    position,
                    kind: NodeKind::Scalar {
                        text: text.into_owned(),
                        plain: style == ScalarStyle::Plain && !tagged_string,
                    },
                };
                if anchor != 0 {
                    self.anchors.insert(anchor, node.clone());
                }
                self.add(node);
            }
            Event::Alias(anchor) => match self.anchors.get(&anchor) {
                Some(node) => {
                    let mut node = node.clone();
                    node.position = position;
                    self.add(node);
                }
                None => self.problems.push(LoadProblem {
                    position,
                    path: None,
                    message: "alias to an unknown anchor".to_owned(),
                }),
            },
            Event::SequenceStart(_, anchor, _) => self.stack.push(Open::Sequence {
                position,
                anchor,
                items: Vec::new(),
            }),
            Event::MappingStart(_, anchor, _) => self.stack.push(Open::Mapping {
                position,
                anchor,
                entries: Vec::new(),
                pending_key: None,
                skipping: false,
            }),
            Event::SequenceEnd | Event::MappingEnd => {
                let node = match self.stack.pop() {
                    Some(Open::Sequence {
                        position,
                        anchor,
                        items,
                    }) => (
                        anchor,
                        Node {
                            position,
                            kind: NodeKind::Sequence(items),
                        },
                    ),
                    Some(Open::Mapping {
                        position,
                        anchor,
                        entries,
                        ..
                    }) => (
                        anchor,
                        Node {
                            position,
                            kind: NodeKind::Mapping(entries),
                        },
                    ),
                    None => return,
                };
                if node.0 != 0 {
                    self.anchors.insert(node.0, node.1.clone());
                }
                self.add(node.1);
            }
            _ => {}
        }
    }

    /// Add a finished node to the innermost open collection (as an item, key or value).
    fn add(&mut self, node: Node) {
        let path = self.current_path();
        match self.stack.last_mut() {
            None => self.root = Some(node),
            Some(Open::Sequence { items, .. }) => items.push(node),
            Some(Open::Mapping {
                entries,
                pending_key,
                skipping,
                ..
            }) => {
                if *skipping {
                    *skipping = false;
                    return;
                }
                match pending_key.take() {
                    Some(key) => entries.push((key, node)),
                    None => {
                        let NodeKind::Scalar { text, .. } = &node.kind else {
                            self.problems.push(LoadProblem {
                                position: node.position,
                                path: Some(path),
                                message: "keys must be strings, not lists or mappings".to_owned(),
                            });
                            *skipping = true;
                            return;
                        };
                        let key_path = join_key(&path, text);
                        if let Some((first, _)) = entries.iter().find(|(key, _)| key.text == *text)
                        {
                            self.problems.push(LoadProblem {
                                position: node.position,
                                path: Some(key_path),
                                message: format!(
                                    "duplicate key (first set at line {}); each key may appear once",
                                    first.position.line
                                ),
                            });
                            *skipping = true;
                            return;
                        }
                        *pending_key = Some(Key {
                            text: text.clone(),
                            position: node.position,
                        });
                    }
                }
            }
        }
    }

    /// The key path of the innermost open collection, for messages.
    fn current_path(&self) -> String {
        let mut path = String::new();
        for open in &self.stack {
            match open {
                Open::Sequence { items, .. } => path.push_str(&format!("[{}]", items.len())),
                Open::Mapping {
                    pending_key: Some(key),
                    ..
                } => path = join_key(&path, &key.text),
                Open::Mapping { .. } => {}
            }
        }
        path
    }
}

/// Append a mapping key to a key path: `a.b`, or `a["x/y"]` for keys that are not identifiers.
pub fn join_key(path: &str, key: &str) -> String {
    let identifier = key
        .chars()
        .next()
        .is_some_and(|first| first.is_ascii_alphabetic() || first == '_')
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    match (path.is_empty(), identifier) {
        (true, true) => key.to_owned(),
        (false, true) => format!("{path}.{key}"),
        (_, false) => format!("{path}[{key:?}]"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_one_based() {
        let (root, problems) = parse_yaml("a:\n  b: 1\n");
        assert!(problems.is_empty());
        let root = root.expect("tree");
        let NodeKind::Mapping(entries) = &root.kind else {
            panic!("mapping")
        };
        assert_eq!(entries[0].0.position, Position { line: 1, column: 1 });
        let NodeKind::Mapping(inner) = &entries[0].1.kind else {
            panic!("mapping")
        };
        assert_eq!(inner[0].0.position, Position { line: 2, column: 3 });
        assert_eq!(inner[0].1.position, Position { line: 2, column: 6 });
    }

    #[test]
    fn duplicate_keys_are_reported_with_both_lines() {
        let (_, problems) = parse_yaml("os:\n  hostname: a\n  hostname: b\n");
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].position.line, 3);
        assert_eq!(problems[0].path.as_deref(), Some("os.hostname"));
        assert!(problems[0].message.contains("line 2"));
    }

    #[test]
    fn core_schema_resolution() {
        assert_eq!(resolve_scalar("0644", true), Resolved::Integer(644));
        assert_eq!(resolve_scalar("0644", false), Resolved::String);
        assert_eq!(resolve_scalar("~", true), Resolved::Null);
        assert_eq!(resolve_scalar("1.5", true), Resolved::Float(1.5));
        assert_eq!(resolve_scalar("ds=nocloud", true), Resolved::String);
        assert_eq!(resolve_scalar("yes", true), Resolved::String);
    }
}
