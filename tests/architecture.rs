//! The architecture as a test: the module graph of `src/` and ARCHITECTURE.md's names.
//!
//! Reads every `crate::…` path of `src/` (in `use` lines and inline), builds the graph of
//! files, and fails when a rule of ARCHITECTURE.md is broken. A second test checks that
//! every `` `path::Symbol` `` ARCHITECTURE.md names exists in `src/`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A file of `src/` as a module path: `hub/handlers.rs` → `hub::handlers`,
/// `hub/mod.rs` → `hub`, `config/tests.rs` → `config::tests`.
fn module_of(file: &Path, src: &Path) -> String {
    let relative = file.strip_prefix(src).expect("under src");
    let mut parts: Vec<String> = relative
        .iter()
        .map(|part| part.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().expect("a file name");
    let stem = last.trim_end_matches(".rs");
    if stem != "mod" && stem != "lib" && stem != "main" {
        parts.push(stem.to_owned());
    }
    parts.join("::")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("readable dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            out.push(path);
        }
    }
}

/// Drops `//` comments (doc comments included) and string literals' contents, roughly:
/// enough that prose naming a module is not read as an import.
fn code_only(line: &str) -> &str {
    match line.find("//") {
        Some(at) => &line[..at],
        None => line,
    }
}

/// Every module path a file refers to with `crate::`, expanding `use crate::{a, b::c}`.
fn references(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let code: String = text.lines().map(code_only).collect::<Vec<_>>().join("\n");
    // `use crate::{auth, hub::{self, Hub}};` → the top-level names inside the braces.
    let mut rest = code.as_str();
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if let Some(inner) = rest.strip_prefix('{') {
            let mut depth = 1;
            let mut end = 0;
            for (i, c) in inner.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            end = i;
                            break;
                        }
                    }
                    _ => {}
                }
            }
            let mut depth = 0;
            let mut item = String::new();
            for c in inner[..end].chars().chain([',']) {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        out.insert(path_of(item.trim()));
                        item.clear();
                        continue;
                    }
                    _ => {}
                }
                item.push(c);
            }
        } else {
            out.insert(path_of(rest));
        }
    }
    out.retain(|path| !path.is_empty());
    out
}

/// `hub::handlers::revoke;…` → `hub::handlers::revoke` (module resolution is done later).
fn path_of(text: &str) -> String {
    text.chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
        .collect::<String>()
        .trim_end_matches(':')
        .to_owned()
}

/// Every file of `src/` by module path, with its text.
fn src_modules() -> BTreeMap<String, String> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files
        .iter()
        .map(|file| {
            (
                module_of(file, &src),
                std::fs::read_to_string(file).expect("readable"),
            )
        })
        .collect()
}

struct Graph {
    /// Module → modules it imports (other modules only, resolved to files).
    edges: BTreeMap<String, BTreeSet<String>>,
    /// Module → external crates it names (`socketioxide`, `axum`).
    externals: BTreeMap<String, BTreeSet<String>>,
}

fn graph() -> Graph {
    let modules = src_modules();
    let mut edges = BTreeMap::new();
    let mut externals = BTreeMap::new();
    for (module, text) in &modules {
        // A file's unit tests (`x/tests.rs`, `mod tests {…}`) may reach anywhere.
        let text = text
            .split("#[cfg(test)]\nmod tests {")
            .next()
            .unwrap_or(text);
        if module.ends_with("::tests") {
            continue;
        }
        let mut targets = BTreeSet::new();
        for path in references(text) {
            // The longest prefix of the path that is a module (a file).
            let segments: Vec<&str> = path.split("::").collect();
            let target = (1..=segments.len())
                .rev()
                .map(|n| segments[..n].join("::"))
                .find(|candidate| modules.contains_key(candidate));
            if let Some(target) = target
                && target != *module
                && !target.starts_with(&format!("{module}::"))
                && !module.starts_with(&format!("{target}::"))
            {
                targets.insert(target);
            }
        }
        // `super::x` in `hub/handlers.rs` is `hub::x`: a submodule's parent and siblings
        // are one unit with it for the rules below, which speak of top-level modules.
        let mut crates = BTreeSet::new();
        for name in ["socketioxide", "engineioxide", "axum", "hyper", "redis"] {
            if text
                .lines()
                .map(code_only)
                .any(|line| line.contains(&format!("{name}::")))
            {
                crates.insert(name.to_owned());
            }
        }
        edges.insert(module.clone(), targets);
        externals.insert(module.clone(), crates);
    }
    Graph { edges, externals }
}

/// The top-level module a module belongs to (`hub::handlers` → `hub`).
fn top(module: &str) -> &str {
    module.split("::").next().unwrap_or(module)
}

impl Graph {
    /// Top-level module → top-level modules it imports.
    fn top_level(&self) -> BTreeMap<String, BTreeSet<String>> {
        let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (module, targets) in &self.edges {
            let from = top(module).to_owned();
            let entry = out.entry(from.clone()).or_default();
            for target in targets {
                if top(target) != from {
                    entry.insert(top(target).to_owned());
                }
            }
        }
        out
    }

    fn imports(&self, from: &str, to: &str) -> bool {
        self.top_level()
            .get(from)
            .is_some_and(|targets| targets.contains(to))
    }

    fn names_crate(&self, from: &str, name: &str) -> bool {
        self.externals
            .iter()
            .any(|(module, crates)| top(module) == from && crates.contains(name))
    }

    /// A cycle among files, if there is one (depth-first search).
    fn cycle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
        fn visit(
            node: &str,
            edges: &BTreeMap<String, BTreeSet<String>>,
            state: &mut BTreeMap<String, u8>,
            stack: &mut Vec<String>,
        ) -> Option<Vec<String>> {
            state.insert(node.to_owned(), 1);
            stack.push(node.to_owned());
            for next in edges.get(node).into_iter().flatten() {
                match state.get(next.as_str()).copied().unwrap_or(0) {
                    1 => {
                        let start = stack.iter().position(|n| n == next).unwrap_or(0);
                        let mut cycle = stack[start..].to_vec();
                        cycle.push(next.clone());
                        return Some(cycle);
                    }
                    0 => {
                        if let Some(cycle) = visit(next, edges, state, stack) {
                            return Some(cycle);
                        }
                    }
                    _ => {}
                }
            }
            stack.pop();
            state.insert(node.to_owned(), 2);
            None
        }
        let mut state = BTreeMap::new();
        for node in edges.keys() {
            if state.get(node.as_str()).copied().unwrap_or(0) == 0 {
                let mut stack = Vec::new();
                if let Some(cycle) = visit(node, edges, &mut state, &mut stack) {
                    return Some(cycle);
                }
            }
        }
        None
    }
}

#[test]
fn the_module_graph_keeps_the_documented_rules() {
    let graph = graph();
    let top = graph.top_level();
    // Positive controls: the reader must see the edges that exist, or every rule below
    // would pass on an empty graph.
    assert!(graph.imports("webhook", "bus"), "webhook → bus: {top:?}");
    assert!(graph.imports("bus", "hub") && graph.imports("bus", "cluster"));
    assert!(graph.imports("hub", "upstream"), "hub → upstream");
    assert!(graph.names_crate("hub", "socketioxide"));

    let mut broken = Vec::new();
    if let Some(cycle) = Graph::cycle(&top) {
        broken.push(format!("a cycle between modules: {}", cycle.join(" → ")));
    }
    let mut rule = |ok: bool, what: &str| {
        if !ok {
            broken.push(what.to_owned());
        }
    };
    rule(!graph.imports("webhook", "hub"), "webhook imports hub");
    // The RabbitMQ ingest is an ingest like the webhook: through the bus, never the hub.
    assert!(graph.imports("amqp", "bus"), "amqp → bus");
    for module in ["hub", "webhook"] {
        rule(
            !graph.imports("amqp", module),
            &format!("amqp imports {module}"),
        );
    }
    for name in ["socketioxide", "axum"] {
        rule(
            !graph.names_crate("amqp", name),
            &format!("amqp names {name}"),
        );
    }
    rule(!graph.imports("hub", "amqp"), "hub imports amqp");
    rule(
        !graph.names_crate("webhook", "socketioxide"),
        "webhook names socketioxide",
    );
    rule(!graph.imports("hub", "webhook"), "hub imports webhook");
    rule(!graph.imports("hub", "bus"), "hub imports bus");
    for module in ["replay", "cluster"] {
        rule(
            !graph.imports(module, "hub"),
            &format!("{module} imports hub"),
        );
        for name in ["socketioxide", "axum"] {
            rule(
                !graph.names_crate(module, name),
                &format!("{module} names {name}"),
            );
        }
    }
    rule(!graph.imports("upstream", "hub"), "upstream imports hub");
    for module in ["hub", "bus"] {
        rule(
            !graph.imports("activity", module),
            &format!("activity imports {module}"),
        );
    }
    // Only `config` composes the sections; the shared value types are a leaf.
    for (module, targets) in &top {
        if module != "config" && module != "app" && module != "lib" && module != "main" {
            rule(
                !targets.contains("config"),
                &format!("{module} imports config (use setting)"),
            );
        }
    }
    for leaf in ["setting", "telemetry", "expiring", "json_object", "license"] {
        rule(
            top.get(leaf).is_none_or(BTreeSet::is_empty),
            &format!("{leaf} is a leaf but imports {:?}", top.get(leaf)),
        );
    }
    assert!(broken.is_empty(), "architecture rules broken: {broken:#?}");
}

/// ARCHITECTURE.md: nothing on the socket.io stack boxes a future per request after the
/// handshake, because a parked long-poll would hold the boxes for its whole wait. The
/// stack's own files must not use `axum::middleware` (`from_fn`, `map_request`, ...).
#[test]
fn the_socketio_stack_uses_no_boxing_middleware() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let code = |file: &str| -> String {
        let text = std::fs::read_to_string(src.join(file)).expect("readable");
        text.lines().map(code_only).collect::<Vec<_>>().join("\n")
    };
    // Positive control: the reader sees `axum::middleware` where it is still used (the
    // operator's endpoints, which never park).
    assert!(
        code("app/mod.rs").contains("axum::middleware::from_fn_with_state"),
        "the check must be able to see a middleware use"
    );
    for file in ["app/socketio.rs", "telemetry.rs"] {
        let code = code(file);
        // The unit tests at the bottom may build anything.
        let code = code.split("#[cfg(test)]").next().unwrap_or_default();
        assert!(
            !code.contains("middleware::"),
            "src/{file} uses axum::middleware, which boxes a future per request"
        );
    }
}

#[test]
fn a_cycle_is_found_when_there_is_one() {
    // The cycle finder itself, on a graph with and without a cycle.
    let edges = |pairs: &[(&str, &str)]| {
        let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (from, to) in pairs {
            out.entry((*from).to_owned())
                .or_default()
                .insert((*to).to_owned());
            out.entry((*to).to_owned()).or_default();
        }
        out
    };
    assert!(Graph::cycle(&edges(&[("a", "b"), ("b", "c")])).is_none());
    let cycle = Graph::cycle(&edges(&[("a", "b"), ("b", "c"), ("c", "a")])).expect("a cycle");
    assert_eq!(cycle.first(), cycle.last());
    // And the reference reader, on the forms `src/` uses.
    let refs = references(
        "use crate::{auth, hub::{self, Hub}};\nuse crate::bus::Bus;\n// crate::webhook in prose\nlet x = crate::telemetry::names::X;",
    );
    let refs: Vec<&str> = refs.iter().map(String::as_str).collect();
    assert_eq!(refs, ["auth", "bus::Bus", "hub", "telemetry::names::X"]);
}

/// Every `` `a::b` `` path in ARCHITECTURE.md whose first segment is a module of `src/`
/// names something that exists: the module file, or an item of that name in it.
#[test]
fn every_symbol_architecture_md_names_exists() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(root.join("ARCHITECTURE.md")).expect("ARCHITECTURE.md");
    let modules = src_modules();
    let tops: BTreeSet<&str> = modules.keys().map(|m| top(m)).collect();
    // The text of a module and its submodules (re-exports and `impl` blocks live there).
    let subtree = |module: &str| -> String {
        modules
            .iter()
            .filter(|(name, _)| *name == module || name.starts_with(&format!("{module}::")))
            .map(|(_, text)| text.as_str())
            .collect()
    };
    let everything: String = modules.values().map(String::as_str).collect();
    let defines = |text: &str, name: &str| {
        [
            format!("fn {name}"),
            format!("struct {name}"),
            format!("enum {name}"),
            format!("type {name}"),
            format!("const {name}"),
            format!("static {name}"),
            format!("trait {name}"),
            format!("mod {name}"),
            format!("    {name} {{"),
            format!("    {name}("),
            format!("    {name},"),
            format!("pub {name}:"),
            format!(" {name}}}"),
            format!(" {name},"),
            format!("{{{name},"),
            format!("{{{name}}}"),
        ]
        .iter()
        .any(|needle| text.contains(needle.as_str()))
    };

    let mut checked = 0;
    let mut missing = Vec::new();
    for span in doc.split('`').skip(1).step_by(2) {
        let path = span.trim_end_matches("()");
        let segments: Vec<&str> = path.split("::").collect();
        let well_formed = segments.len() >= 2
            && segments
                .iter()
                .all(|s| !s.is_empty() && s.chars().all(|c| c.is_alphanumeric() || c == '_'));
        if !well_formed {
            continue;
        }
        let (scope, items) = if tops.contains(segments[0]) {
            // `hub::delivery::run`: the longest prefix that is a module, then its items.
            let n = (1..=segments.len())
                .rev()
                .find(|n| modules.contains_key(&segments[..*n].join("::")))
                .unwrap_or(1);
            (subtree(&segments[..n].join("::")), &segments[n..])
        } else if segments[0].starts_with(|c: char| c.is_ascii_uppercase()) {
            // `Hub::deliver`: a type of src/ and its item.
            (everything.clone(), &segments[..])
        } else {
            continue; // another crate's path (`tokio::spawn`)
        };
        checked += 1;
        if let Some(item) = items.iter().find(|item| !defines(&scope, item)) {
            missing.push(format!("{path} ({item})"));
        }
    }
    assert!(
        checked > 20,
        "only {checked} paths checked: is the reader broken?"
    );
    assert!(
        missing.is_empty(),
        "ARCHITECTURE.md names what src/ does not have: {missing:?}"
    );
}

/// Every test the fault table of ARCHITECTURE.md names (`` `tests/x.rs` `name` ``) exists,
/// so a row cannot point at a test that was renamed or removed.
#[test]
fn every_test_the_fault_table_names_exists() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(root.join("ARCHITECTURE.md")).expect("ARCHITECTURE.md");
    let table = doc
        .split("## Faults")
        .nth(1)
        .and_then(|rest| rest.split("\n## ").next())
        .expect("a Faults section");
    let mut checked = 0;
    let mut missing = Vec::new();
    for row in table.lines().filter(|line| line.starts_with('|')) {
        let Some(cell) = row.trim_end_matches('|').rsplit('|').next() else {
            continue;
        };
        let mut file: Option<String> = None;
        for span in cell.split('`').skip(1).step_by(2) {
            if span.starts_with("tests/") && span.ends_with(".rs") {
                file = std::fs::read_to_string(root.join(span)).ok();
                if file.is_none() {
                    missing.push(span.to_owned());
                }
            } else if let Some(text) = &file
                && span
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            {
                checked += 1;
                if !text.contains(&format!("fn {span}(")) {
                    missing.push(span.to_owned());
                }
            }
        }
    }
    assert!(
        checked >= 10,
        "only {checked} tests checked: is the reader broken?"
    );
    assert!(
        missing.is_empty(),
        "the fault table names missing tests: {missing:?}"
    );
}
