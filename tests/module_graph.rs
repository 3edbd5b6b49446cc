//! The module graph has no cycles: none between files, none between top-level modules.
//!
//! Reads `src/` as text (no build of its own): every `use crate::…`, `use super::…` and
//! inline `crate::…` path outside a `#[cfg(test)] mod` block is an edge from the file to
//! the deepest module it names. A child using its parent (or a parent its child) is not
//! counted. Between top-level modules, an edge into a *leaf* file (one that imports
//! nothing from the crate; a `mod.rs` stands for its children too) closes no cycle, so
//! shared leaves such as `config::units` or `date` are imported by their own path. The
//! layering this keeps is written in the crate's top doc (`src/lib.rs`).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed test"
)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Module = Vec<String>;

/// Every file of `src/` as its module path, with its non-test text.
fn files(src: &Path) -> BTreeMap<Module, String> {
    let test_block =
        regex::Regex::new(r"#\[cfg\(test\)\]\s*(?:pub(?:\(\w+\))?\s+)?mod\s+\w+\s*\{").unwrap();
    let mut out = BTreeMap::new();
    let mut dirs: Vec<PathBuf> = vec![src.to_owned()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if !name.ends_with(".rs") || name == "tests.rs" {
                continue;
            }
            let rel = path.strip_prefix(src).unwrap().with_extension("");
            let mut module: Module = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if module.last().is_some_and(|m| m == "mod") {
                module.pop();
            }
            if module == ["lib"] || module == ["main"] {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let text = test_block.split(&text).next().unwrap_or("").to_owned();
            out.insert(module, text);
        }
    }
    out
}

/// The paths a `use` tree names: `a::{b, c::{d}}` → `a::b`, `a::c::d`.
fn expand(prefix: &[String], body: &str, out: &mut Vec<Vec<String>>) {
    if let Some(inner) = body.strip_prefix('{').and_then(|b| b.strip_suffix('}')) {
        let (mut depth, mut current) = (0, String::new());
        for ch in inner.chars() {
            match ch {
                ',' if depth == 0 => {
                    if !current.is_empty() {
                        expand(prefix, &current, out);
                    }
                    current.clear();
                    continue;
                }
                '{' => depth += 1,
                '}' => depth -= 1,
                _ => {}
            }
            current.push(ch);
        }
        if !current.is_empty() {
            expand(prefix, &current, out);
        }
    } else if let Some(i) = body.find("::{") {
        let mut p = prefix.to_vec();
        p.extend(body[..i].split("::").map(str::to_owned));
        expand(&p, &body[i + 2..], out);
    } else {
        let mut p = prefix.to_vec();
        p.extend(body.split("::").map(str::to_owned));
        out.push(p);
    }
}

/// The module graph: edges between files, and the files that import from the crate.
fn graph(files: &BTreeMap<Module, String>) -> (BTreeSet<(Module, Module)>, BTreeSet<Module>) {
    let comment = regex::Regex::new(r"//.*").unwrap();
    let use_stmt = regex::Regex::new(r"\buse\s+([^;]+);").unwrap();
    let inline = regex::Regex::new(r"\bcrate::[a-z_][a-z0-9_:]*").unwrap();
    let resolve = |path: &[String]| -> Option<Module> {
        (1..=path.len())
            .rev()
            .map(|k| path[..k].to_vec())
            .find(|m| files.contains_key(m))
    };
    let (mut edges, mut uses) = (BTreeSet::new(), BTreeSet::new());
    for (module, text) in files {
        let text = comment.replace_all(text, "");
        let mut refs = Vec::new();
        for caps in use_stmt.captures_iter(&text) {
            let tree: String = caps[1].chars().filter(|c| !c.is_whitespace()).collect();
            expand(&[], &tree, &mut refs);
        }
        for m in inline.find_iter(&text) {
            refs.push(m.as_str().split("::").map(str::to_owned).collect());
        }
        for r in refs {
            let path: Vec<String> = match r.first().map(String::as_str) {
                Some("crate") => r[1..].to_vec(),
                Some("super") => {
                    let mut p = module[..module.len() - 1].to_vec();
                    p.extend(r[1..].iter().cloned());
                    p
                }
                _ => continue,
            };
            let Some(target) = resolve(&path) else {
                continue;
            };
            if &target == module {
                continue;
            }
            uses.insert(module.clone());
            if module.starts_with(&target) || target.starts_with(module) {
                continue; // a child using its parent, or a parent its child
            }
            edges.insert((module.clone(), target));
        }
    }
    (edges, uses)
}

/// Strongly connected components with more than one member (Tarjan).
fn cycles<N: Ord + Clone>(graph: &BTreeMap<N, BTreeSet<N>>) -> Vec<Vec<N>> {
    struct State<N> {
        index: BTreeMap<N, usize>,
        low: BTreeMap<N, usize>,
        stack: Vec<N>,
        on: BTreeSet<N>,
        out: Vec<Vec<N>>,
    }
    fn strong<N: Ord + Clone>(v: &N, g: &BTreeMap<N, BTreeSet<N>>, s: &mut State<N>) {
        let n = s.index.len();
        s.index.insert(v.clone(), n);
        s.low.insert(v.clone(), n);
        s.stack.push(v.clone());
        s.on.insert(v.clone());
        for w in g.get(v).into_iter().flatten() {
            if !s.index.contains_key(w) {
                strong(w, g, s);
                let low = s.low[v].min(s.low[w]);
                s.low.insert(v.clone(), low);
            } else if s.on.contains(w) {
                let low = s.low[v].min(s.index[w]);
                s.low.insert(v.clone(), low);
            }
        }
        if s.low[v] == s.index[v] {
            let mut component = Vec::new();
            loop {
                let w = s.stack.pop().unwrap();
                s.on.remove(&w);
                let done = &w == v;
                component.push(w);
                if done {
                    break;
                }
            }
            if component.len() > 1 {
                component.sort();
                s.out.push(component);
            }
        }
    }
    let mut state = State {
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in graph.keys() {
        if !state.index.contains_key(v) {
            strong(v, graph, &mut state);
        }
    }
    state.out
}

#[test]
fn no_import_cycles_between_files_or_top_level_modules() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let files = files(&src);
    let (edges, uses) = graph(&files);
    // The walk sees the graph at all: a known edge of the layering is there.
    let known = (
        vec!["listener".to_owned(), "session".to_owned()],
        vec!["spool".to_owned()],
    );
    assert!(edges.contains(&known), "the import parser found no edges");

    let leaves: BTreeSet<&Module> = files
        .keys()
        .filter(|t| !uses.iter().any(|u| u.starts_with(t)))
        .collect();
    let (mut by_file, mut by_top) = (BTreeMap::new(), BTreeMap::new());
    for (a, b) in &edges {
        by_file
            .entry(a.join("::"))
            .or_insert_with(BTreeSet::new)
            .insert(b.join("::"));
        if a[0] != b[0] && !leaves.contains(b) {
            by_top
                .entry(a[0].clone())
                .or_insert_with(BTreeSet::new)
                .insert(b[0].clone());
        }
    }
    let mut found = Vec::new();
    for c in cycles(&by_top) {
        found.push(format!("modules: {}", c.join(" <-> ")));
    }
    for c in cycles(&by_file) {
        found.push(format!("files: {}", c.join(" <-> ")));
    }
    assert!(
        found.is_empty(),
        "import cycles (see the layering in src/lib.rs):\n{}",
        found.join("\n")
    );
}

#[test]
fn use_trees_expand_to_paths() {
    let mut out = Vec::new();
    expand(&[], "crate::{a::{b,c},d}", &mut out);
    let joined: Vec<String> = out.iter().map(|p| p.join("::")).collect();
    assert_eq!(joined, ["crate::a::b", "crate::a::c", "crate::d"]);
}

#[test]
fn a_cycle_is_found() {
    let mut g: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    g.entry("a").or_default().insert("b");
    g.entry("b").or_default().insert("a");
    g.entry("c").or_default().insert("a");
    assert_eq!(cycles(&g), [vec!["a", "b"]]);
}
