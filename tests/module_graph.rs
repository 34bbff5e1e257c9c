//! The library's module graph has no cycle: no two modules under `src/`
//! import each other, directly or around a loop (issue 14).
//!
//! Every `crate::` and `super::` path in `src/` (use statements, brace
//! groups included, and inline paths; comments skipped) is resolved to the
//! deepest module it names. A reference between two modules counts at the
//! level where their paths part: `store::sqlite::open` using
//! `actors::store` is an edge `store → actors` among the crate's top-level
//! modules, and `store::sqlite` using `store::memory` is an edge
//! `sqlite → memory` inside `store`. A module using its own ancestor or
//! descendant is not an edge (a module includes its submodules). Any cycle
//! among the edges fails the test, naming a file and line for each edge.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

type ModulePath = Vec<String>;

/// Where one edge was seen: a file and a line.
#[derive(Debug, Clone)]
struct Evidence {
    file: PathBuf,
    line: usize,
}

fn source_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            source_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The module a file defines: `src/a/b.rs` and `src/a/b/mod.rs` are `a::b`.
fn module_of(src: &Path, file: &Path) -> ModulePath {
    let relative = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: ModulePath = relative
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod" || p == "lib") {
        parts.pop();
    }
    parts
}

/// The code of a line with its comment removed (strings holding `//` are
/// rare enough in this crate not to matter for paths).
fn code_part(line: &str) -> &str {
    match line.find("//") {
        Some(at) => &line[..at],
        None => line,
    }
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Expands a use tree such as `a::{b::{C, D}, e}` into its paths.
fn expand_use_tree(tree: &str) -> Vec<String> {
    let tree: String = tree.chars().filter(|c| !c.is_whitespace()).collect();
    let Some(open) = tree.find('{') else {
        return vec![tree];
    };
    let prefix = &tree[..open];
    let close = tree.rfind('}').unwrap_or(tree.len());
    let inner = &tree[open + 1..close];
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&inner[start..]);
    parts
        .into_iter()
        .filter(|p| !p.is_empty())
        .flat_map(|p| expand_use_tree(p))
        .map(|p| format!("{prefix}{p}"))
        .collect()
}

/// Every path in `code` that starts with `crate::` or `super::`, as
/// segments, with the line it starts on. `$crate::` (macros) is skipped.
fn paths_in(code: &str) -> Vec<(Vec<String>, usize)> {
    let mut found = Vec::new();
    let line_of = |offset: usize| code[..offset].matches('\n').count() + 1;
    let bytes = code.as_bytes();
    for keyword in ["crate::", "super::"] {
        let mut from = 0;
        while let Some(pos) = code[from..].find(keyword) {
            let at = from + pos;
            from = at + keyword.len();
            let preceded_by_ident =
                at > 0 && (is_ident_char(bytes[at - 1] as char) || bytes[at - 1] == b'$');
            if preceded_by_ident {
                continue;
            }
            // The path runs over identifiers, `::`, and one brace group.
            let mut end = at;
            let mut depth = 0usize;
            for (i, c) in code[at..].char_indices() {
                let ok = is_ident_char(c)
                    || c == ':'
                    || (depth > 0 && (c == ',' || c.is_whitespace() || c == '*'))
                    || c == '{'
                    || (c == '}' && depth > 0);
                if !ok {
                    break;
                }
                if c == '{' {
                    depth += 1;
                }
                if c == '}' {
                    depth -= 1;
                }
                end = at + i + c.len_utf8();
            }
            for path in expand_use_tree(&code[at..end]) {
                let segments: Vec<String> = path
                    .split("::")
                    .filter(|s| !s.is_empty() && *s != "*")
                    .map(str::to_owned)
                    .collect();
                found.push((segments, line_of(at)));
            }
        }
    }
    found
}

/// Resolves a path's segments to the deepest known module it names.
fn resolve(
    segments: &[String],
    current: &ModulePath,
    is_mod_rs: bool,
    known: &BTreeSet<ModulePath>,
) -> Option<ModulePath> {
    let mut base: ModulePath;
    let mut rest = segments;
    match rest.first().map(String::as_str) {
        Some("crate") => {
            base = Vec::new();
            rest = &rest[1..];
        }
        Some("super") => {
            // In `a/b.rs` (module a::b) as in `a/b/mod.rs`, `super` is `a`.
            let _ = is_mod_rs;
            base = current.clone();
            while rest.first().is_some_and(|s| s == "super") {
                base.pop()?;
                rest = &rest[1..];
            }
        }
        _ => return None,
    }
    for segment in rest {
        let mut next = base.clone();
        next.push(segment.clone());
        if known.contains(&next) {
            base = next;
        } else {
            break;
        }
    }
    Some(base)
}

/// The edge a reference from `from` to `to` makes, lifted to the level where
/// the two paths part; `None` when one contains the other.
fn lifted_edge(from: &ModulePath, to: &ModulePath) -> Option<(ModulePath, ModulePath)> {
    let common = from.iter().zip(to).take_while(|(a, b)| a == b).count();
    if common == from.len() || common == to.len() {
        return None;
    }
    Some((from[..=common].to_vec(), to[..=common].to_vec()))
}

type Graph = BTreeMap<ModulePath, BTreeMap<ModulePath, Evidence>>;

fn module_graph(src: &Path) -> Graph {
    let mut files = Vec::new();
    source_files(src, &mut files);
    files.retain(|f| f.file_name().is_some_and(|n| n != "main.rs"));
    let known: BTreeSet<ModulePath> = files.iter().map(|f| module_of(src, f)).collect();
    let mut graph = Graph::new();
    for file in &files {
        let module = module_of(src, file);
        let is_mod_rs = file.file_name().is_some_and(|n| n == "mod.rs");
        let text = fs::read_to_string(file).unwrap();
        let code: String = text.lines().map(code_part).collect::<Vec<_>>().join("\n");
        for (segments, line) in paths_in(&code) {
            let Some(target) = resolve(&segments, &module, is_mod_rs, &known) else {
                continue;
            };
            if let Some((a, b)) = lifted_edge(&module, &target) {
                graph.entry(a).or_default().entry(b).or_insert(Evidence {
                    file: file.clone(),
                    line,
                });
            }
        }
    }
    graph
}

/// One cycle in the graph, if any, as the modules around it.
fn find_cycle(graph: &Graph) -> Option<Vec<ModulePath>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Visiting,
        Done,
    }
    fn visit(
        node: &ModulePath,
        graph: &Graph,
        marks: &mut BTreeMap<ModulePath, Mark>,
        stack: &mut Vec<ModulePath>,
    ) -> Option<Vec<ModulePath>> {
        match marks.get(node) {
            Some(Mark::Done) => return None,
            Some(Mark::Visiting) => {
                let start = stack.iter().position(|n| n == node).unwrap_or(0);
                return Some(stack[start..].to_vec());
            }
            None => {}
        }
        marks.insert(node.clone(), Mark::Visiting);
        stack.push(node.clone());
        for next in graph.get(node).into_iter().flat_map(|edges| edges.keys()) {
            if let Some(cycle) = visit(next, graph, marks, stack) {
                return Some(cycle);
            }
        }
        stack.pop();
        marks.insert(node.clone(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for node in graph.keys() {
        let mut stack = Vec::new();
        if let Some(cycle) = visit(node, graph, &mut marks, &mut stack) {
            return Some(cycle);
        }
    }
    None
}

fn describe(cycle: &[ModulePath], graph: &Graph) -> String {
    let name = |m: &ModulePath| format!("crate::{}", m.join("::"));
    let mut lines = Vec::new();
    for (i, from) in cycle.iter().enumerate() {
        let to = &cycle[(i + 1) % cycle.len()];
        let evidence = &graph[from][to];
        lines.push(format!(
            "  {} -> {} ({}:{})",
            name(from),
            name(to),
            evidence.file.display(),
            evidence.line
        ));
    }
    lines.join("\n")
}

#[test]
fn no_two_modules_import_each_other() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let graph = module_graph(&src);
    // The checker sees the layering it guards: the handle starts the
    // actors, and both sit on the delivery core.
    let edge = |from: &str, to: &str| {
        graph
            .get(&vec![from.to_owned()])
            .is_some_and(|edges| edges.contains_key(&vec![to.to_owned()]))
    };
    assert!(edge("worker", "actors") && edge("actors", "delivery"));
    assert!(edge("worker", "delivery"));
    if let Some(cycle) = find_cycle(&graph) {
        panic!("import cycle among modules:\n{}", describe(&cycle, &graph));
    }
}

#[test]
fn the_checker_finds_a_planted_cycle() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path();
    fs::create_dir_all(src.join("store/sqlite")).unwrap();
    fs::write(src.join("lib.rs"), "pub mod store;\npub mod worker;\n").unwrap();
    fs::write(
        src.join("store/mod.rs"),
        "pub mod sqlite;\nuse super::worker::Config;\n",
    )
    .unwrap();
    fs::write(
        src.join("store/sqlite/mod.rs"),
        "use crate::store::Thing; // a child using its parent: not an edge\n",
    )
    .unwrap();
    fs::write(
        src.join("worker.rs"),
        "use crate::{item, store::sqlite::{Open, Close}};\n",
    )
    .unwrap();
    let graph = module_graph(src);
    let cycle = find_cycle(&graph).expect("store <-> worker is a cycle");
    let text = describe(&cycle, &graph);
    assert!(text.contains("crate::store -> crate::worker"), "{text}");
    assert!(text.contains("crate::worker -> crate::store"), "{text}");

    // Break the loop: the child's use of its parent alone is no cycle.
    fs::write(src.join("store/mod.rs"), "pub mod sqlite;\n").unwrap();
    assert!(find_cycle(&module_graph(src)).is_none());
}

#[test]
fn use_trees_expand_to_every_path() {
    let mut paths = expand_use_tree("crate::a::{b::{C, D}, e, f::*}");
    paths.sort();
    assert_eq!(
        paths,
        [
            "crate::a::b::C",
            "crate::a::b::D",
            "crate::a::e",
            "crate::a::f::*"
        ]
    );
}
