//! The house rules a newcomer relies on to find their way, checked on the source:
//! no two modules of a crate import each other, directly or round a circle, so
//! every module can be read after the ones it uses; and no file's production part
//! (what stands above its `#[cfg(test)]`) is over 600 lines.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

const CRATES: [&str; 3] = ["proto", "proxy", "control-plane"];
const MAX_PRODUCTION_LINES: usize = 600;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace")
        .to_path_buf()
}

/// The hand-written Rust files under `dir`: a `gen/` directory holds generated
/// code (`generated.rs`), which the house's rules do not judge.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() && !path.ends_with("gen") {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `src/stack/balance/mod.rs` -> `stack::balance`; `src/lib.rs` -> `` (the root).
fn module_of(src: &Path, file: &Path) -> String {
    let relative = file.strip_prefix(src).expect("under src");
    let mut parts: Vec<String> = relative
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_owned())
        .collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
        parts.pop();
    }
    parts.join("::")
}

/// The code of a file without its tests, comments and string contents.
fn code_of(text: &str) -> String {
    let mut code = String::with_capacity(text.len());
    for line in text.lines().take(production_lines(text)) {
        let line = match line.find("//") {
            Some(i) => &line[..i],
            None => line,
        };
        code.push_str(line);
        code.push('\n');
    }
    code
}

/// Every path a file names through `crate::`, `super::` or `self::`, with use
/// groups (`a::{b, c::d}`) expanded, resolved against the file's own module.
fn paths_named(module: &str, code: &str) -> Vec<Vec<String>> {
    let mut found = Vec::new();
    let bytes = code.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let rest = &code[i..];
        let starts = ["crate::", "super::", "self::"]
            .iter()
            .any(|p| rest.starts_with(p));
        let boundary = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        if starts && boundary {
            let end = path_end(rest);
            for path in expand(&rest[..end]) {
                found.push(resolve(module, &path));
            }
            i += end.max(1);
        } else {
            i += 1;
        }
    }
    found
}

/// Where a path (with any `{...}` groups) ends.
fn path_end(text: &str) -> usize {
    let mut depth = 0usize;
    for (i, c) in text.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth > 0 => depth -= 1,
            c if depth == 0 && !(c.is_alphanumeric() || c == '_' || c == ':') => return i,
            _ => {}
        }
    }
    text.len()
}

/// `a::{b, c::{d, e}}` -> `a::b`, `a::c::d`, `a::c::e`.
fn expand(path: &str) -> Vec<String> {
    let Some(open) = path.find('{') else {
        return vec![path.trim().trim_end_matches("::").to_owned()];
    };
    let prefix = &path[..open];
    let inner = &path[open + 1..path.rfind('}').unwrap_or(path.len())];
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth = depth.saturating_sub(1),
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
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .flat_map(|p| {
            let p = p.split(" as ").next().unwrap_or(p);
            expand(&format!("{prefix}{p}"))
        })
        .collect()
}

/// Paths into the module's own children written without a prefix (`child::f()`,
/// `use child::T;`), resolved from the crate root.
fn child_paths(module: &str, code: &str, modules: &BTreeSet<String>) -> Vec<Vec<String>> {
    let prefix = if module.is_empty() {
        String::new()
    } else {
        format!("{module}::")
    };
    let children: Vec<&str> = modules
        .iter()
        .filter_map(|m| m.strip_prefix(prefix.as_str()))
        .filter(|rest| !rest.is_empty() && !rest.contains("::"))
        .collect();
    let bytes = code.as_bytes();
    let mut found = Vec::new();
    for child in children {
        let needle = format!("{child}::");
        for (i, _) in code.match_indices(&needle) {
            let before = &code[..i];
            let preceded = before.ends_with("::")
                || before
                    .bytes()
                    .last()
                    .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !preceded && i + needle.len() <= bytes.len() {
                found.push(resolve(module, &format!("self::{child}")));
            }
        }
    }
    found
}

/// A path's segments from the crate root.
fn resolve(module: &str, path: &str) -> Vec<String> {
    let mut here: Vec<String> = module
        .split("::")
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    let mut segments = path.split("::").filter(|s| !s.is_empty()).peekable();
    match segments.peek().copied() {
        Some("crate") => {
            here.clear();
            segments.next();
        }
        _ => {
            while let Some(&head) = segments.peek() {
                match head {
                    "super" => {
                        here.pop();
                    }
                    "self" => {}
                    _ => break,
                }
                segments.next();
            }
        }
    }
    here.extend(segments.filter(|s| *s != "self").map(str::to_owned));
    here
}

/// The module a path points into: its longest prefix that is a module.
fn target(path: &[String], modules: &BTreeSet<String>) -> Option<String> {
    (0..=path.len())
        .rev()
        .map(|n| path[..n].join("::"))
        .find(|m| modules.contains(m))
}

/// A circle of imports, if the graph has one.
fn find_cycle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(node.to_owned(), 1);
        stack.push(node.to_owned());
        for next in edges.get(node).into_iter().flatten() {
            match state.get(next.as_str()) {
                Some(1) => {
                    let start = stack.iter().position(|m| m == next).unwrap_or(0);
                    let mut cycle = stack[start..].to_vec();
                    cycle.push(next.clone());
                    return Some(cycle);
                }
                Some(_) => {}
                None => {
                    if let Some(cycle) = visit(next, edges, state, stack) {
                        return Some(cycle);
                    }
                }
            }
        }
        stack.pop();
        state.insert(node.to_owned(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for node in edges.keys() {
        if !state.contains_key(node.as_str()) {
            if let Some(cycle) = visit(node, edges, &mut state, &mut Vec::new()) {
                return Some(cycle);
            }
        }
    }
    None
}

/// Module -> the modules it imports, for one crate.
fn import_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    // The binary's main.rs is a crate of its own, importing the library by name.
    files.retain(|f| f.file_name().is_some_and(|n| n != "main.rs"));
    let modules: BTreeSet<String> = files.iter().map(|f| module_of(src, f)).collect();
    let mut edges = BTreeMap::new();
    for file in &files {
        let module = module_of(src, file);
        let text = fs::read_to_string(file).expect("readable source");
        let code = code_of(&text);
        let mut paths = paths_named(&module, &code);
        paths.extend(child_paths(&module, &code, &modules));
        let imports: BTreeSet<String> = paths
            .iter()
            .filter_map(|path| target(path, &modules))
            .filter(|t| *t != module)
            .collect();
        edges.insert(module, imports);
    }
    edges
}

#[test]
fn no_two_modules_import_each_other_directly_or_round_a_circle() {
    for krate in CRATES {
        let src = workspace().join(krate).join("src");
        let graph = import_graph(&src);
        assert!(graph.len() > 3, "{krate}: read {} modules", graph.len());
        if let Some(cycle) = find_cycle(&graph) {
            panic!("{krate}: modules import each other: {}", cycle.join(" -> "));
        }
    }
}

/// The lines above a file's inline test module (`#[cfg(test)]` then `mod … {`);
/// a test-only module declared in a line (`#[cfg(test)] mod testing;`) counts as
/// production, so it cannot hide what follows it.
fn production_lines(text: &str) -> usize {
    let lines: Vec<&str> = text.lines().collect();
    (0..lines.len())
        .find(|&i| lines[i] == "#[cfg(test)]" && lines.get(i + 1).is_some_and(|l| l.ends_with('{')))
        .unwrap_or(lines.len())
}

#[test]
fn no_production_part_of_a_file_is_over_600_lines() {
    let mut too_long = Vec::new();
    for krate in CRATES {
        let mut files = Vec::new();
        rust_files(&workspace().join(krate).join("src"), &mut files);
        for file in files {
            let text = fs::read_to_string(&file).expect("readable source");
            let lines = production_lines(&text);
            if lines > MAX_PRODUCTION_LINES {
                too_long.push(format!("{}: {lines}", file.display()));
            }
        }
    }
    assert!(
        too_long.is_empty(),
        "over {MAX_PRODUCTION_LINES} lines: {too_long:?}"
    );
}

#[test]
fn the_cycle_finder_sees_a_circle_and_resolves_relative_paths() {
    let mut graph = BTreeMap::new();
    graph.insert("a".to_owned(), BTreeSet::from(["b".to_owned()]));
    graph.insert("b".to_owned(), BTreeSet::from(["c".to_owned()]));
    graph.insert("c".to_owned(), BTreeSet::from(["a".to_owned()]));
    assert_eq!(find_cycle(&graph).unwrap(), ["a", "b", "c", "a"]);
    graph.insert("c".to_owned(), BTreeSet::new());
    assert!(find_cycle(&graph).is_none());

    let paths = paths_named(
        "stack::retry",
        "use super::{outcome::{A, B}, stage::Next};\nuse crate::rng::Rng as R; let x = self::y::Z;",
    );
    let joined: Vec<String> = paths.iter().map(|p| p.join("::")).collect();
    assert_eq!(
        production_lines("a\n#[cfg(test)]\npub mod testing;\nb\n#[cfg(test)]\nmod tests {\n}"),
        4
    );
    let modules = BTreeSet::from(["stack".to_owned(), "stack::retry".to_owned()]);
    let children = child_paths(
        "stack",
        "let r = retry::Retry::new(); x::retry::y;",
        &modules,
    );
    assert_eq!(children, [vec!["stack".to_owned(), "retry".to_owned()]]);
    assert_eq!(
        joined,
        [
            "stack::outcome::A",
            "stack::outcome::B",
            "stack::stage::Next",
            "rng::Rng",
            "stack::retry::y::Z"
        ]
    );
}
