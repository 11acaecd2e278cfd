//! `docs/protocol.md` lists the server's limits in a table; `nbd-server limits` prints them;
//! both come from one table in the code (`nbd_server::limits::LIMITS`). These tests hold the
//! page to that table both ways (every row of the page is a limit with that value and
//! description, every limit is a row of the page) and the command to it, so a changed
//! constant fails here until the page says the same.

use std::collections::BTreeMap;

use nbd_server::limits::LIMITS;

/// The rows of the table under `## Limits` in docs/protocol.md: name -> (value, what).
fn page_rows() -> BTreeMap<String, (String, String)> {
    let page = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/protocol.md"))
        .unwrap();
    let section = page
        .split("\n## ")
        .find(|s| s.starts_with("Limits"))
        .expect("docs/protocol.md has a Limits section");
    let mut rows = BTreeMap::new();
    for line in section.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        assert_eq!(cells.len(), 3, "a row has name, value, what: {line:?}");
        let name = cells[0].trim_matches('`').to_owned();
        let row = (cells[1].to_owned(), cells[2].to_owned());
        assert!(rows.insert(name, row).is_none(), "{line:?} is listed twice");
    }
    rows
}

#[test]
fn limits_table_in_protocol_md_matches_the_code() {
    let mut rows = page_rows();
    for l in LIMITS {
        let (value, what) = rows
            .remove(l.name)
            .unwrap_or_else(|| panic!("docs/protocol.md's table should list {}", l.name));
        assert_eq!(value, l.shown(), "{} is {} in the code", l.name, l.shown());
        assert_eq!(what, l.what, "what {} bounds, as the code says it", l.name);
    }
    assert!(
        rows.is_empty(),
        "docs/protocol.md lists limits the code does not have: {:?}",
        rows.keys()
    );
}

/// The numbers the table shows, read back to bytes, seconds or counts, are the values that
/// `nbd-server limits --json` prints.
#[test]
fn limits_command_prints_the_table() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_nbd-server"))
        .args(["limits", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let printed: BTreeMap<String, u64> = serde_json::from_slice(&out.stdout).unwrap();
    let page: BTreeMap<String, u64> = page_rows()
        .into_iter()
        .map(|(name, (value, _))| {
            let (number, unit) = value.split_once(' ').unwrap_or((&value, ""));
            let scale = match unit {
                "MiB" => 1 << 20,
                "KiB" => 1 << 10,
                "" | "s" | "ms" | "bytes" => 1,
                u => panic!("{name}: unknown unit {u:?}"),
            };
            (name, number.parse::<u64>().unwrap() * scale)
        })
        .collect();
    assert_eq!(printed, page);
}
