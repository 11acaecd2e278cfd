//! No function in `nbd-server/src` or `crashmonkey/src` is longer than [`FUNCTION_LINES_MAX`]
//! lines (issue 14: a data path a newcomer can read in one sitting). This test reads the
//! sources. They are formatted by rustfmt, so a function's body ends at the first line after
//! its `fn` line that is a `}` at the `fn` line's indentation; a declaration without a body
//! ends at a `;` before any `{`.

use std::path::{Path, PathBuf};

/// Lines from a function's `fn` line to its closing brace, both counted.
const FUNCTION_LINES_MAX: usize = 100;

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read src") {
        let p = e.expect("entry").path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Whether `line` (without its indentation) starts a function item.
fn starts_fn(line: &str) -> bool {
    let mut rest = line;
    for prefix in [
        "pub(crate) ",
        "pub(super) ",
        "pub ",
        "const ",
        "async ",
        "unsafe ",
    ] {
        if let Some(r) = rest.strip_prefix(prefix) {
            rest = r;
        }
    }
    rest.starts_with("fn ")
}

/// (name, first line, lines) of every function in `text` longer than `max` lines.
fn long_functions(text: &str, max: usize) -> Vec<(String, usize, usize)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let body = line.trim_start();
        if !starts_fn(body) {
            continue;
        }
        let indent = line.len() - body.len();
        let closing = lines[i..].iter().position(|l| {
            let t = l.trim_start();
            l.len() - t.len() == indent && t.starts_with('}')
        });
        // The signature ends at the first `{` or `;`: no body (`;`) or an empty one (`{}`)
        // is not measured.
        let signature_end = lines[i..]
            .iter()
            .map(|l| l.trim_end())
            .find(|l| l.ends_with(';') || l.contains('{'));
        if signature_end.is_none_or(|l| l.ends_with(';') || l.ends_with("{}")) {
            continue;
        }
        let Some(end) = closing else { continue };
        if end + 1 > max {
            let name = body.split("fn ").nth(1).unwrap_or("");
            let name = name.split(['(', '<']).next().unwrap_or("").to_owned();
            out.push((name, i + 1, end + 1));
        }
    }
    out
}

#[test]
fn no_function_is_longer_than_the_limit() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = Vec::new();
    for dir in ["nbd-server/src", "crashmonkey/src"] {
        sources(&root.join(dir), &mut files);
    }
    assert!(files.len() > 20, "found the sources: {files:?}");
    let mut long = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        for (name, line, lines) in long_functions(&text, FUNCTION_LINES_MAX) {
            long.push(format!("{}:{line}: fn {name}: {lines} lines", f.display()));
        }
    }
    assert!(
        long.is_empty(),
        "functions over {FUNCTION_LINES_MAX} lines:\n{}",
        long.join("\n")
    );
}

/// The measure itself: a function of 4 lines is 4 lines, nested blocks do not end it early,
/// and a declaration or an empty body is not taken for the start of a long function.
#[test]
fn lengths_are_measured_from_fn_to_its_closing_brace() {
    let text = "fn a() {\n    if x {\n    }\n}\ntrait T {\n    fn b(&self);\n    fn c(&self) {}\n    fn d() {\n    }\n}\n";
    assert_eq!(long_functions(text, 3), [("a".to_owned(), 1, 4)]);
    assert!(long_functions(text, 4).is_empty());
}
