//! The module layering holds: no import cycle among the crate's top-level modules, and the CPU
//! reference (`src/reference/`) and the GPU engine (`src/cuda/`) are sibling leaves that never
//! name each other (what they share lives in `types`, `real`, `model`, `prefix`; `devices` is the
//! one module that opens either). Read from the sources: every `crate::<module>` path outside
//! comments, per file, attributed to the file's top-level module.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Top-level module → the top-level modules its files name.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    let mut stack = vec![src.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                files.push(p);
            }
        }
    }
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in files {
        let top = top_module(&src, &f);
        if top == "lib" || top == "main" {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap();
        for line in text.lines() {
            let code = line.split("//").next().unwrap_or("");
            let mut rest = code;
            while let Some(i) = rest.find("crate::") {
                rest = &rest[i + "crate::".len()..];
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() && name != top {
                    g.entry(top.clone()).or_default().insert(name);
                }
            }
        }
        g.entry(top).or_default();
    }
    g
}

fn top_module(src: &Path, f: &Path) -> String {
    let rel = f.strip_prefix(src).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_string()
}

/// A cycle through `start`, if any (depth-first search).
fn cycle_from(g: &BTreeMap<String, BTreeSet<String>>, start: &str) -> Option<Vec<String>> {
    fn walk(
        g: &BTreeMap<String, BTreeSet<String>>,
        start: &str,
        at: &str,
        path: &mut Vec<String>,
        seen: &mut BTreeSet<String>,
    ) -> bool {
        for next in g.get(at).into_iter().flatten() {
            if next == start {
                path.push(next.clone());
                return true;
            }
            if seen.insert(next.clone()) {
                path.push(next.clone());
                if walk(g, start, next, path, seen) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    let mut path = vec![start.to_string()];
    let mut seen = BTreeSet::new();
    walk(g, start, start, &mut path, &mut seen).then_some(path)
}

#[test]
fn no_import_cycle_between_top_level_modules() {
    let g = graph();
    assert!(g.len() > 10, "too few modules found: {g:?}");
    let cycles: Vec<String> = g
        .keys()
        .filter_map(|m| cycle_from(&g, m))
        .map(|c| c.join(" -> "))
        .collect();
    for (m, deps) in &g {
        println!(
            "{m} -> {}",
            deps.iter().cloned().collect::<Vec<_>>().join(", ")
        );
    }
    assert!(cycles.is_empty(), "import cycles: {cycles:#?}");
}

#[test]
fn the_reference_and_the_gpu_engine_never_name_each_other() {
    let g = graph();
    let deps = |m: &str| g.get(m).cloned().unwrap_or_default();
    assert!(
        !deps("cuda").contains("reference"),
        "cuda names reference: {:?}",
        deps("cuda")
    );
    assert!(
        !deps("reference").contains("cuda"),
        "reference names cuda: {:?}",
        deps("reference")
    );
    assert!(
        !deps("engine").contains("cuda"),
        "engine names cuda: {:?}",
        deps("engine")
    );
    // The checker sees what it must: both modules exist and name their shared layers.
    assert!(deps("cuda").contains("types") && deps("reference").contains("prefix"));
}

/// The checker itself: a cycle planted in a graph is found, and an acyclic one passes.
#[test]
fn the_cycle_check_finds_a_planted_cycle() {
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let edge = |g: &mut BTreeMap<String, BTreeSet<String>>, a: &str, b: &str| {
        g.entry(a.into()).or_default().insert(b.into());
        g.entry(b.into()).or_default();
    };
    edge(&mut g, "a", "b");
    edge(&mut g, "b", "c");
    assert!(g.keys().all(|m| cycle_from(&g, m).is_none()));
    edge(&mut g, "c", "a");
    assert_eq!(cycle_from(&g, "a").unwrap(), ["a", "b", "c", "a"]);
}
