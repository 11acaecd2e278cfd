//! `docs/bundles.md` and the code agree, in both directions. Guards against a bundle format
//! that drifts from its document: a key renamed, added, reordered or made optional in the
//! code and not on the page, a documented key the code no longer writes, an enumeration value
//! or operation the page lacks or the code no longer has.
//!
//! - Real bundles, written now by the `crashmonkey` binary (`race`, `fs campaign`) and the
//!   committed ones in `fixtures/`, are read against the page's tables: every key is in its
//!   object's table, with the table's JSON type, in the table's order; a required key is in
//!   every object; every key of every table is written by some bundle.
//! - One value of every variant of every enumeration, operation and failure, made by the code,
//!   serializes as a row of its table, and every row is one of them.
//! - A key the page says may be left out loads without it; no other key does. What the page
//!   says readers refuse is refused, and unknown keys are ignored.
//! - A folder holds the files of its table; `device-log.json`'s hashes are what the page's rule
//!   computes from `device.log`'s payloads; the constants the page names are the code's.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use crashmonkey::fscore::bundle::{self as fs_bundle, FS_BUNDLE_KIND, FS_BUNDLE_VERSION};
use crashmonkey::fscore::workload::{WorkloadKind, CAMPAIGN_DEVICE_BLOCKS};
use crashmonkey::race::repro::BUNDLE_VERSION;
use crashmonkey::race::PolicyKind;
use crashmonkey::states::StateKind;
use fs_core::block::{RecordKind, BLOCK_SIZE};
use fs_core::oracle::Seen;
use fs_core::sched::{
    FILES_PER_WORKLOAD_MAX, FIRST_OP_TASK, OPS_PER_WORKLOAD_MAX, TASK_FLUSHER, TASK_IO_COMPLETION,
    TASK_RECLAIM,
};
use fs_core::{AllocMode, Failure, Op, PunchMode, ValidityCheckAt};
use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

const DOC: &str = include_str!("../../docs/bundles.md");

// ---- reading the page ----

/// The text after `marker`, which must occur exactly once.
fn after(marker: &str) -> &'static str {
    let at = DOC
        .find(marker)
        .unwrap_or_else(|| panic!("{marker} is not in docs/bundles.md"));
    assert!(
        !DOC[at + 1..].contains(marker),
        "{marker} is in docs/bundles.md twice"
    );
    &DOC[at + marker.len()..]
}

/// The rows of the markdown table right after `marker`, without the header and separator,
/// each cell trimmed (backticks kept: [`plain`] drops them).
fn table(marker: &str) -> Vec<Vec<String>> {
    let rows: Vec<Vec<String>> = after(marker)
        .lines()
        .skip_while(|l| l.trim().is_empty())
        .take_while(|l| l.starts_with('|'))
        .map(|l| {
            l.trim()
                .trim_matches('|')
                .split('|')
                .map(|c| c.trim().to_string())
                .collect()
        })
        .collect();
    assert!(rows.len() > 2, "the table after {marker} has no rows");
    rows[2..].to_vec()
}

fn plain(cell: &str) -> String {
    cell.replace('`', "")
}

/// A JSON type as the tables write it.
#[derive(Debug, Clone, PartialEq)]
enum Ty {
    /// An unsigned integer no larger than this.
    Int(u64),
    Bool,
    Str,
    Array(Box<Ty>),
    Tuple(Vec<Ty>),
    OrNull(Box<Ty>),
    /// A type with a table of its own.
    Named(String),
}

/// Splits `s` at `sep` outside brackets and parentheses.
fn split_top(s: &str, sep: char) -> Vec<String> {
    let (mut out, mut cur, mut depth) = (Vec::new(), String::new(), 0i32);
    for c in s.chars() {
        match c {
            '[' | '(' => depth += 1,
            ']' | ')' => depth -= 1,
            _ => {}
        }
        if c == sep && depth == 0 {
            out.push(cur.trim().to_string());
            cur.clear();
        } else {
            cur.push(c);
        }
    }
    out.push(cur.trim().to_string());
    out
}

fn parse_ty(s: &str) -> Ty {
    let s = s.trim();
    if let Some(inner) = s.strip_suffix(" or null") {
        return Ty::OrNull(Box::new(parse_ty(inner)));
    }
    if let Some(inner) = s.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
        return Ty::Array(Box::new(parse_ty(inner)));
    }
    if let Some(inner) = s.strip_prefix('(').and_then(|r| r.strip_suffix(')')) {
        return Ty::Tuple(split_top(inner, ',').iter().map(|t| parse_ty(t)).collect());
    }
    match s {
        "u8" => Ty::Int(u8::MAX.into()),
        "u32" => Ty::Int(u32::MAX.into()),
        "u64" => Ty::Int(u64::MAX),
        "usize" => Ty::Int(usize::MAX as u64),
        "bool" => Ty::Bool,
        "string" => Ty::Str,
        name if name.starts_with(|c: char| c.is_ascii_uppercase())
            && name.chars().all(|c| c.is_ascii_alphanumeric()) =>
        {
            Ty::Named(name.to_string())
        }
        other => panic!("docs/bundles.md: {other:?} is not a type the page defines"),
    }
}

/// One key of an object (or field of a variant).
#[derive(Debug, Clone)]
struct Field {
    name: String,
    ty: Ty,
    /// `optional T`: left out when it has no value.
    optional: bool,
    /// The meaning says "may be absent".
    may_be_absent: bool,
}

impl Field {
    /// A reader loads the bundle without this key (the page's rule).
    fn may_be_left_out(&self) -> bool {
        self.optional || self.may_be_absent || matches!(self.ty, Ty::OrNull(_))
    }
}

fn field(name: &str, ty: &str, meaning: &str) -> Field {
    let ty = plain(ty);
    let (optional, ty) = match ty.trim().strip_prefix("optional ") {
        Some(t) => (true, t.to_string()),
        None => (false, ty),
    };
    Field {
        name: plain(name),
        ty: parse_ty(&ty),
        optional,
        may_be_absent: meaning.contains("may be absent"),
    }
}

#[derive(Debug, Clone)]
struct ValueRow {
    value: String,
    /// How it is written, integers zeroed: the row's "written `...`" with N as 0, else the
    /// string `value`.
    written: J,
}

#[derive(Debug, Clone)]
struct Variant {
    name: String,
    fields: Vec<Field>,
}

#[derive(Debug, Clone)]
enum Def {
    Keys(Vec<Field>),
    Values(Vec<ValueRow>),
    Variants { tag: String, rows: Vec<Variant> },
}

type Schema = BTreeMap<String, Def>;

/// Every `<!-- keys:NAME -->`, `<!-- values:NAME -->` and `<!-- variants:NAME tag=KEY -->`
/// table of the page; each named type a table uses must have a table.
fn schema() -> &'static Schema {
    static SCHEMA: OnceLock<Schema> = OnceLock::new();
    SCHEMA.get_or_init(|| {
        let mut out = Schema::new();
        for (at, _) in DOC.match_indices("<!-- ") {
            let head = &DOC[at + 5..];
            let head = &head[..head.find(" -->").expect("an unclosed comment")];
            let marker = format!("<!-- {head} -->");
            let (kind, rest) = head.split_once(':').unwrap_or((head, ""));
            let def = match kind {
                "keys" => Def::Keys(
                    table(&marker)
                        .iter()
                        .map(|r| field(&r[0], &r[1], &r[2]))
                        .collect(),
                ),
                "values" => Def::Values(table(&marker).iter().map(|r| value_row(r)).collect()),
                "variants" => {
                    let tag = rest
                        .split_once(" tag=")
                        .unwrap_or_else(|| panic!("{marker}: no tag="))
                        .1
                        .to_string();
                    let rows = table(&marker)
                        .iter()
                        .map(|r| Variant {
                            name: plain(&r[0]),
                            fields: variant_fields(&r[1]),
                        })
                        .collect();
                    Def::Variants { tag, rows }
                }
                _ => continue,
            };
            let name = rest.split(' ').next().unwrap().to_string();
            assert!(out.insert(name.clone(), def).is_none(), "{name} twice");
        }
        let mut used = Vec::new();
        for def in out.values() {
            let fields: Vec<&Field> = match def {
                Def::Keys(f) => f.iter().collect(),
                Def::Variants { rows, .. } => rows.iter().flat_map(|v| &v.fields).collect(),
                Def::Values(_) => vec![],
            };
            for f in fields {
                named_in(&f.ty, &mut used);
            }
        }
        for name in used {
            assert!(
                out.contains_key(&name),
                "docs/bundles.md uses type {name} but has no table for it"
            );
        }
        out
    })
}

fn named_in(ty: &Ty, out: &mut Vec<String>) {
    match ty {
        Ty::Named(n) => out.push(n.clone()),
        Ty::Array(t) | Ty::OrNull(t) => named_in(t, out),
        Ty::Tuple(ts) => ts.iter().for_each(|t| named_in(t, out)),
        Ty::Int(_) | Ty::Bool | Ty::Str => {}
    }
}

fn value_row(r: &[String]) -> ValueRow {
    let value = plain(&r[0]);
    let written = match r[1].split_once("written `") {
        Some((_, rest)) => {
            let json = &rest[..rest.find('`').expect("an unclosed `")];
            parse_j(&json.replace('N', "0"))
        }
        None => J::Str(value.clone()),
    };
    ValueRow { value, written }
}

/// A variant's fields cell: `(none)`, or `` `name` type `` items separated by commas.
fn variant_fields(cell: &str) -> Vec<Field> {
    if cell.trim() == "(none)" {
        return vec![];
    }
    split_top(cell, ',')
        .iter()
        .map(|item| {
            let item = item.trim();
            let rest = item.strip_prefix('`').expect("a field name in backticks");
            let (name, ty) = rest.split_once('`').unwrap();
            field(name, ty, "")
        })
        .collect()
}

fn def(name: &str) -> &'static Def {
    schema()
        .get(name)
        .unwrap_or_else(|| panic!("docs/bundles.md has no table for {name}"))
}

// ---- JSON with its keys in written order ----

/// A JSON value whose objects keep their keys in the order they were written
/// (`serde_json::Value` sorts them).
#[derive(Debug, Clone, PartialEq)]
enum J {
    Null,
    Bool(bool),
    Num(serde_json::Number),
    Str(String),
    Arr(Vec<J>),
    Obj(Vec<(String, J)>),
}

impl<'de> Deserialize<'de> for J {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<J, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = J;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("JSON")
            }
            fn visit_unit<E>(self) -> Result<J, E> {
                Ok(J::Null)
            }
            fn visit_bool<E>(self, b: bool) -> Result<J, E> {
                Ok(J::Bool(b))
            }
            fn visit_u64<E>(self, n: u64) -> Result<J, E> {
                Ok(J::Num(n.into()))
            }
            fn visit_i64<E>(self, n: i64) -> Result<J, E> {
                Ok(J::Num(n.into()))
            }
            fn visit_f64<E: serde::de::Error>(self, n: f64) -> Result<J, E> {
                serde_json::Number::from_f64(n)
                    .map(J::Num)
                    .ok_or_else(|| E::custom("not a JSON number"))
            }
            fn visit_str<E>(self, s: &str) -> Result<J, E> {
                Ok(J::Str(s.to_string()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<J, A::Error> {
                let mut v = Vec::new();
                while let Some(x) = a.next_element()? {
                    v.push(x);
                }
                Ok(J::Arr(v))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<J, A::Error> {
                let mut v = Vec::new();
                while let Some(kv) = a.next_entry()? {
                    v.push(kv);
                }
                Ok(J::Obj(v))
            }
        }
        d.deserialize_any(V)
    }
}

fn parse_j(text: &str) -> J {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// `x` as the code writes it, keys in written order.
fn written<T: serde::Serialize>(x: &T) -> J {
    parse_j(&serde_json::to_string(x).unwrap())
}

/// `v` with every number made 0: the shape a values row's "written" compares with.
fn shape(v: &J) -> J {
    match v {
        J::Num(_) => J::Num(0u64.into()),
        J::Arr(a) => J::Arr(a.iter().map(shape).collect()),
        J::Obj(o) => J::Obj(o.iter().map(|(k, x)| (k.clone(), shape(x))).collect()),
        other => other.clone(),
    }
}

// ---- holding JSON to the tables ----

/// Reads JSON against the page, collecting what it saw and what was wrong.
#[derive(Default)]
struct Reader {
    /// Only `optional` keys may be missing (a bundle this build wrote); else keys marked
    /// "may be absent" may be too (a committed bundle, maybe older).
    strict: bool,
    errors: Vec<String>,
    /// (table, key) pairs written, variants as `Table.variant`.
    keys_seen: BTreeSet<(String, String)>,
    values_seen: BTreeSet<(String, String)>,
    /// The first place each (table, key) was seen, as a JSON pointer.
    first_at: BTreeMap<(String, String), String>,
}

impl Reader {
    fn fail(&mut self, at: &str, what: String) {
        self.errors.push(format!("{at}: {what}"));
    }

    fn read(&mut self, v: &J, ty: &Ty, at: &str) {
        match (ty, v) {
            (Ty::OrNull(_), J::Null) => {}
            (Ty::OrNull(t), v) => self.read(v, t, at),
            (Ty::Int(max), J::Num(n)) => match n.as_u64() {
                Some(x) if x <= *max => {}
                _ => self.fail(at, format!("{n} is not an integer in 0..={max}")),
            },
            (Ty::Bool, J::Bool(_)) | (Ty::Str, J::Str(_)) => {}
            (Ty::Array(t), J::Arr(a)) => {
                for (i, x) in a.iter().enumerate() {
                    self.read(x, t, &format!("{at}/{i}"));
                }
            }
            (Ty::Tuple(ts), J::Arr(a)) if a.len() == ts.len() => {
                for (i, (x, t)) in a.iter().zip(ts).enumerate() {
                    self.read(x, t, &format!("{at}/{i}"));
                }
            }
            (Ty::Named(name), v) => self.read_named(name, v, at),
            (ty, v) => self.fail(at, format!("{v:?} is not a {ty:?}")),
        }
    }

    fn read_named(&mut self, name: &str, v: &J, at: &str) {
        match (def(name), v) {
            (Def::Keys(fields), J::Obj(o)) => self.read_object(name, fields, o, at),
            (Def::Values(rows), v) => match rows.iter().find(|r| r.written == shape(v)) {
                Some(r) => {
                    self.values_seen.insert((name.into(), r.value.clone()));
                }
                None => self.fail(at, format!("{v:?} is no value of {name}'s table")),
            },
            (Def::Variants { tag, rows }, J::Obj(o)) => {
                let Some((k, J::Str(which))) = o.first() else {
                    return self.fail(at, format!("a {name} does not start with `{tag}`"));
                };
                if k != tag {
                    return self.fail(at, format!("a {name} starts with `{k}`, not `{tag}`"));
                }
                match rows.iter().find(|r| &r.name == which) {
                    Some(r) => {
                        let table = format!("{name}.{which}");
                        self.keys_seen.insert((name.into(), which.clone()));
                        self.read_object(&table, &r.fields, &o[1..], at);
                    }
                    None => self.fail(at, format!("{tag} `{which}` is not in {name}'s table")),
                }
            }
            (_, v) => self.fail(at, format!("{v:?} is not a {name}")),
        }
    }

    fn read_object(&mut self, table: &str, fields: &[Field], o: &[(String, J)], at: &str) {
        let mut last = None;
        for (k, x) in o {
            let here = format!("{at}/{k}");
            let Some(i) = fields.iter().position(|f| &f.name == k) else {
                self.fail(
                    &here,
                    format!("`{k}` is written but not in {table}'s table"),
                );
                continue;
            };
            if last.is_some_and(|l| i < l) {
                self.fail(
                    &here,
                    format!("`{k}` is written out of {table}'s table order"),
                );
            }
            last = Some(i);
            let key = (table.to_string(), k.clone());
            self.first_at.entry(key.clone()).or_insert(here.clone());
            self.keys_seen.insert(key);
            self.read(x, &fields[i].ty, &here);
        }
        for f in fields {
            let missing = !o.iter().any(|(k, _)| k == &f.name);
            let allowed = f.optional || (!self.strict && f.may_be_absent);
            if missing && !allowed {
                self.fail(at, format!("{table}'s `{}` is not written", f.name));
            }
        }
    }

    fn assert_clean(&self, what: &str) {
        assert!(
            self.errors.is_empty(),
            "{what} disagrees with docs/bundles.md:\n{}",
            self.errors.join("\n")
        );
    }
}

// ---- real bundles ----

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Race,
    Fs,
}

impl Kind {
    fn root(self) -> Ty {
        Ty::Named(match self {
            Kind::Race => "RaceBundle".into(),
            Kind::Fs => "FsBundle".into(),
        })
    }

    fn files_marker(self) -> &'static str {
        match self {
            Kind::Race => "<!-- files:race -->",
            Kind::Fs => "<!-- files:fs -->",
        }
    }

    /// Loads a bundle as `--replay` does.
    fn load(self, path: &Path) -> anyhow::Result<()> {
        match self {
            Kind::Race => crashmonkey::race::load_bundle(path).map(drop),
            Kind::Fs => fs_bundle::load(path).map(drop),
        }
    }
}

struct Bundle {
    dir: PathBuf,
    kind: Kind,
    /// Written by this build's binary in this test run.
    fresh: bool,
}

impl Bundle {
    fn text(&self) -> String {
        std::fs::read_to_string(self.dir.join("bundle.json")).unwrap()
    }
}

fn crashmonkey(args: &[&str], out: &Path) {
    let run = Command::new(env!("CARGO_BIN_EXE_crashmonkey"))
        .args(args)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    assert_eq!(
        run.status.code(),
        Some(1),
        "crashmonkey {args:?} was to find a failure and write its bundle: {}",
        String::from_utf8_lossy(&run.stderr)
    );
}

/// Bundles the binary writes now (a race finding and an fs crash finding), then every
/// committed one.
fn bundles() -> &'static [Bundle] {
    static ALL: OnceLock<Vec<Bundle>> = OnceLock::new();
    ALL.get_or_init(|| {
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("bundles_doc");
        let _ = std::fs::remove_dir_all(&out);
        std::fs::create_dir_all(&out).unwrap();
        let race = ["race", "--seed", "9079", "--runs", "1", "--no-iomap-valid"];
        // Each a campaign folder of its own: one folder holds one campaign.
        crashmonkey(&race, &out.join("race"));
        let fs = [
            "fs",
            "campaign",
            "--seed",
            "1",
            "--runs",
            "100",
            "--bug",
            "fsync-no-log-force",
            "--max-failures",
            "1",
        ];
        crashmonkey(&fs, &out.join("fs"));
        let mut all = vec![
            Bundle {
                dir: out.join("race/race-seed-9079"),
                kind: Kind::Race,
                fresh: true,
            },
            Bundle {
                dir: out.join("fs/fs-seed-1"),
                kind: Kind::Fs,
                fresh: true,
            },
        ];
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures");
        let mut dirs: Vec<PathBuf> = std::fs::read_dir(fixtures.join("race"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        for bug in std::fs::read_dir(fixtures.join("fs")).unwrap() {
            for d in std::fs::read_dir(bug.unwrap().path()).unwrap() {
                dirs.push(d.unwrap().path());
            }
        }
        dirs.sort();
        for dir in dirs {
            let name = dir.file_name().unwrap().to_string_lossy().into_owned();
            let kind = if name.starts_with("race-seed-") {
                Kind::Race
            } else {
                assert!(name.starts_with("fs-seed-"), "{}", dir.display());
                Kind::Fs
            };
            all.push(Bundle {
                dir,
                kind,
                fresh: false,
            });
        }
        all
    })
}

// ---- the tests ----

/// Every key a real bundle writes is in the page with its type and in its order, every
/// required key is written, and every key of every table is written by some bundle.
#[test]
fn real_bundles_are_what_the_tables_say() {
    let mut reader = Reader::default();
    for b in bundles() {
        reader.strict = b.fresh;
        let at = b.dir.display().to_string();
        reader.read(&parse_j(&b.text()), &b.kind.root(), &at);
        if b.kind == Kind::Race {
            let file = |f: &str| parse_j(&std::fs::read_to_string(b.dir.join(f)).unwrap());
            reader.read(
                &file("device-log.json"),
                &parse_ty("[DeviceRecord]"),
                &format!("{at}/device-log.json"),
            );
        }
    }
    reader.assert_clean("a real bundle");
    // Variants are held to the code by `every_variant_is_a_row_and_every_row_a_variant`:
    // real bundles hold few of them.
    let mut unwritten = Vec::new();
    for (name, d) in schema() {
        if let Def::Keys(fields) = d {
            unwritten.extend(
                fields
                    .iter()
                    .map(|f| (name.clone(), f.name.clone()))
                    .filter(|k| !reader.keys_seen.contains(k)),
            );
        }
    }
    assert!(
        unwritten.is_empty(),
        "docs/bundles.md documents keys no bundle writes: {unwritten:?}"
    );
}

/// The race bundle's `workload.json` and `schedule.json` are its `bundle.json`'s values, as
/// the page says (the second on one line).
#[test]
fn race_bundle_side_files_are_its_values() {
    for b in bundles().iter().filter(|b| b.kind == Kind::Race) {
        let v: crashmonkey::race::Bundle = serde_json::from_str(&b.text()).unwrap();
        let workload = std::fs::read_to_string(b.dir.join("workload.json")).unwrap();
        let want = serde_json::to_string_pretty(&v.workload).unwrap();
        assert_eq!(workload, want, "{}", b.dir.display());
        let schedule = std::fs::read_to_string(b.dir.join("schedule.json")).unwrap();
        let want = serde_json::to_string(&v.schedule).unwrap();
        assert_eq!(schedule, want, "{}", b.dir.display());
        assert!(!schedule.contains('\n'));
    }
}

/// `bundle.json` is `serde_json`'s pretty print of the code's own structure, byte for byte
/// (two-space indentation, no newline at the end), as the page says.
#[test]
fn bundle_json_is_the_pretty_print_of_the_code_s_bundle() {
    for b in bundles().iter().filter(|b| b.fresh) {
        let text = b.text();
        let again = match b.kind {
            Kind::Race => {
                let x: crashmonkey::race::Bundle = serde_json::from_str(&text).unwrap();
                serde_json::to_string_pretty(&x).unwrap()
            }
            Kind::Fs => {
                let x: fs_bundle::FsBundle = serde_json::from_str(&text).unwrap();
                serde_json::to_string_pretty(&x).unwrap()
            }
        };
        assert_eq!(text, again, "{}", b.dir.display());
        assert!(text.starts_with("{\n  \"version\": ") && text.ends_with('}'));
    }
}

/// One value of every variant, as the code makes them. Each match has no wildcard: a new
/// variant fails to compile here until it is added to the list (and then fails the test
/// until the page has its row).
fn every_variant() -> Vec<(&'static str, J)> {
    let mut out = Vec::new();
    for v in [
        ValidityCheckAt::AfterFolioLock,
        ValidityCheckAt::InGetFolio,
        ValidityCheckAt::BeforeFolioLock,
    ] {
        match v {
            ValidityCheckAt::AfterFolioLock
            | ValidityCheckAt::InGetFolio
            | ValidityCheckAt::BeforeFolioLock => out.push(("ValidityCheckAt", written(&v))),
        }
    }
    for v in [PunchMode::Old, PunchMode::Fixed] {
        match v {
            PunchMode::Old | PunchMode::Fixed => out.push(("PunchMode", written(&v))),
        }
    }
    for v in [AllocMode::Delalloc, AllocMode::AtWrite] {
        match v {
            AllocMode::Delalloc | AllocMode::AtWrite => out.push(("AllocMode", written(&v))),
        }
    }
    for v in [WorkloadKind::Ace, WorkloadKind::Random] {
        match v {
            WorkloadKind::Ace | WorkloadKind::Random => out.push(("WorkloadKind", written(&v))),
        }
    }
    for v in [PolicyKind::Random, PolicyKind::Pct] {
        match v {
            PolicyKind::Random | PolicyKind::Pct => out.push(("PolicyKind", written(&v))),
        }
    }
    for v in [
        StateKind::Initial,
        StateKind::Prefix,
        StateKind::Subset,
        StateKind::Torn,
    ] {
        match v {
            StateKind::Initial | StateKind::Prefix | StateKind::Subset | StateKind::Torn => {
                out.push(("StateKind", written(&v)))
            }
        }
    }
    for v in [Seen::Read { op: 3 }, Seen::AfterSync, Seen::Cached] {
        match v {
            Seen::Read { .. } | Seen::AfterSync | Seen::Cached => out.push(("Seen", written(&v))),
        }
    }
    for v in [
        RecordKind::Write,
        RecordKind::FuaWrite,
        RecordKind::Flush,
        RecordKind::Trim,
    ] {
        match v {
            RecordKind::Write | RecordKind::FuaWrite | RecordKind::Flush | RecordKind::Trim => {
                out.push(("RecordKind", written(&v)))
            }
        }
    }
    let (file, offset, len, byte) = (1, 4096, 100, b'A');
    for v in [
        Op::Write {
            file,
            offset,
            len,
            byte,
        },
        Op::Read { file, offset, len },
        Op::MmapStore {
            file,
            offset,
            len,
            byte,
        },
        Op::DirectWrite {
            file,
            offset,
            len,
            byte,
        },
        Op::Fallocate { file, offset, len },
        Op::PunchHole { file, offset, len },
        Op::ZeroRange { file, offset, len },
        Op::Truncate { file, size: 5 },
        Op::Fsync { file },
        Op::FallocateKeepSize { file, offset, len },
        Op::Fdatasync { file },
        Op::Sync,
        Op::Create { file },
        Op::Unlink { file },
        Op::Rename { from: 0, to: 1 },
        Op::Link { file, to: 2 },
    ] {
        match v {
            Op::Write { .. }
            | Op::Read { .. }
            | Op::MmapStore { .. }
            | Op::DirectWrite { .. }
            | Op::Fallocate { .. }
            | Op::PunchHole { .. }
            | Op::ZeroRange { .. }
            | Op::Truncate { .. }
            | Op::Fsync { .. }
            | Op::FallocateKeepSize { .. }
            | Op::Fdatasync { .. }
            | Op::Sync
            | Op::Create { .. }
            | Op::Unlink { .. }
            | Op::Rename { .. }
            | Op::Link { .. } => out.push(("Op", written(&v))),
        }
    }
    for v in [
        Failure::WrongData {
            file: 0,
            offset: 7,
            expected: 65,
            found: 0,
            expected_from: Some(1),
            found_from: None,
            seen: Seen::AfterSync,
        },
        Failure::WrongSize {
            file: 0,
            expected: 10,
            found: 0,
        },
        Failure::Invariant { what: "x".into() },
        Failure::Deadlock {
            blocked: vec!["task 3 (write) is blocked".into()],
        },
        Failure::StepLimit { steps: 9 },
        Failure::Harness { what: "x".into() },
    ] {
        match v {
            Failure::WrongData { .. }
            | Failure::WrongSize { .. }
            | Failure::Invariant { .. }
            | Failure::Deadlock { .. }
            | Failure::StepLimit { .. }
            | Failure::Harness { .. } => out.push(("Failure", written(&v))),
        }
    }
    out
}

/// Every variant the code has is a row of its table, written as the row says, and every row
/// of every values and variants table is a variant the code has.
#[test]
fn every_variant_is_a_row_and_every_row_a_variant() {
    let mut reader = Reader {
        strict: true,
        ..Reader::default()
    };
    for (i, (name, v)) in every_variant().iter().enumerate() {
        reader.read(v, &Ty::Named(name.to_string()), &format!("{name} #{i}"));
    }
    reader.assert_clean("the code's variants");
    for (name, d) in schema() {
        let rows: Vec<(String, bool)> = match d {
            Def::Values(rows) => rows
                .iter()
                .map(|r| {
                    let seen = reader
                        .values_seen
                        .contains(&(name.clone(), r.value.clone()));
                    (r.value.clone(), seen)
                })
                .collect(),
            Def::Variants { rows, .. } => rows
                .iter()
                .map(|r| {
                    let seen = reader.keys_seen.contains(&(name.clone(), r.name.clone()));
                    (r.name.clone(), seen)
                })
                .collect(),
            Def::Keys(_) => continue,
        };
        for (row, seen) in rows {
            assert!(
                seen,
                "{name}'s table has `{row}`, which the code does not have"
            );
        }
    }
}

/// Parses a bundle file's JSON, changes it, and loads the result as `--replay` does.
fn load_changed(b: &Bundle, change: impl FnOnce(&mut serde_json::Value)) -> anyhow::Result<()> {
    let mut v: serde_json::Value = serde_json::from_str(&b.text()).unwrap();
    change(&mut v);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bundle.json");
    std::fs::write(&path, serde_json::to_string(&v).unwrap()).unwrap();
    b.kind.load(&path)
}

/// Removes `key` from the object at JSON pointer `parent`.
fn remove(v: &mut serde_json::Value, parent: &str, key: &str) {
    let obj = v
        .pointer_mut(parent)
        .and_then(|p| p.as_object_mut())
        .unwrap_or_else(|| panic!("no object at {parent}"));
    assert!(obj.remove(key).is_some(), "no {key} at {parent}");
}

/// A key the page says may be left out loads without it, and no other key does; every
/// key written by some bundle is tried, in the first bundle that writes it.
#[test]
fn keys_the_page_lets_readers_miss_are_the_ones_they_can() {
    let mut wrong = Vec::new();
    let mut tried = BTreeSet::new();
    for b in bundles() {
        assert!(b.kind.load(&b.dir).is_ok(), "{} loads", b.dir.display());
        let mut reader = Reader::default();
        let at = String::new();
        reader.read(&parse_j(&b.text()), &b.kind.root(), &at);
        for ((table, key), pointer) in &reader.first_at {
            if !tried.insert((table.clone(), key.clone())) {
                continue;
            }
            let f = match def(table.split('.').next().unwrap()) {
                Def::Keys(fields) => fields.iter().find(|f| &f.name == key),
                Def::Variants { rows, .. } => {
                    let variant = table.split_once('.').unwrap().1;
                    let row = rows.iter().find(|r| r.name == variant).unwrap();
                    row.fields.iter().find(|f| &f.name == key)
                }
                Def::Values(_) => None,
            }
            .unwrap();
            let parent = &pointer[..pointer.rfind('/').unwrap()];
            let loads = load_changed(b, |v| remove(v, parent, key)).is_ok();
            if loads != f.may_be_left_out() {
                wrong.push(format!(
                    "{table}'s `{key}` (at {pointer} of {}): the page says it {} be left \
                     out, and without it the bundle {}",
                    b.dir.display(),
                    if f.may_be_left_out() {
                        "may"
                    } else {
                        "may not"
                    },
                    if loads { "loads" } else { "does not load" },
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// What the page says readers refuse is refused, up to the limits it names and not before,
/// and unknown keys are ignored.
#[test]
fn readers_refuse_what_the_page_says() {
    let race = bundles().iter().find(|b| b.kind == Kind::Race).unwrap();
    let fs = bundles().iter().find(|b| b.kind == Kind::Fs).unwrap();
    let ops = |n: usize| serde_json::json!([vec![serde_json::json!({"op": "sync"}); n]]);
    for b in [race, fs] {
        let d = b.dir.display();
        assert!(load_changed(b, |v| v["version"] = 2.into()).is_err(), "{d}");
        assert!(load_changed(b, |v| v["workload"]["files"] = 0.into()).is_err());
        let most = FILES_PER_WORKLOAD_MAX;
        assert!(load_changed(b, |v| v["workload"]["files"] = most.into()).is_ok());
        assert!(load_changed(b, |v| v["workload"]["files"] = (most + 1).into()).is_err());
        let most = OPS_PER_WORKLOAD_MAX;
        assert!(load_changed(b, |v| v["workload"]["phases"] = ops(most)).is_ok());
        assert!(load_changed(b, |v| v["workload"]["phases"] = ops(most + 1)).is_err());
        assert!(
            load_changed(b, |v| v["not_a_key"] = "x".into()).is_ok(),
            "{d}"
        );
    }
    assert!(load_changed(fs, |v| v["kind"] = "race".into()).is_err());
    let blocks = CAMPAIGN_DEVICE_BLOCKS * 2;
    assert!(load_changed(fs, |v| v["device_blocks"] = blocks.into()).is_err());
}

/// The constants the page names are the code's.
#[test]
fn constants_on_the_page_are_the_code_s() {
    for want in [
        format!("`{BUNDLE_VERSION}` (`BUNDLE_VERSION`)"),
        format!("`{FS_BUNDLE_VERSION}` (`FS_BUNDLE_VERSION`)"),
        format!("`{FS_BUNDLE_KIND}` (`FS_BUNDLE_KIND`)"),
        format!("`CAMPAIGN_DEVICE_BLOCKS`, {CAMPAIGN_DEVICE_BLOCKS}"),
        format!("{FILES_PER_WORKLOAD_MAX} files (`FILES_PER_WORKLOAD_MAX`)"),
        format!("{OPS_PER_WORKLOAD_MAX} operations (`OPS_PER_WORKLOAD_MAX`)"),
        format!("1 to {FILES_PER_WORKLOAD_MAX} |"),
        format!("in {} KiB blocks", BLOCK_SIZE / 1024),
        format!(
            "{TASK_IO_COMPLETION} IO completion, {TASK_FLUSHER} the flusher, {TASK_RECLAIM} \
             reclaim, {FIRST_OP_TASK} + N the workload's operation N"
        ),
    ] {
        // Lines are wrapped: compare with runs of white space as one space.
        let doc = DOC.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(doc.contains(&want), "docs/bundles.md does not say {want:?}");
    }
}

/// Each folder holds exactly the files of its table (an fs bundle without a crash state:
/// without the three files the page says it lacks).
#[test]
fn folders_hold_the_files_of_their_tables() {
    for b in bundles() {
        let mut want: BTreeSet<String> = table(b.kind.files_marker())
            .iter()
            .map(|r| plain(&r[0]))
            .collect();
        let v: serde_json::Value = serde_json::from_str(&b.text()).unwrap();
        if b.kind == Kind::Fs && v["state"].is_null() {
            assert!(DOC.contains("no `crash.img`, `fsck.txt` or `oracle.txt`"));
            for f in ["crash.img", "fsck.txt", "oracle.txt"] {
                want.remove(f);
            }
        }
        let have: BTreeSet<String> = std::fs::read_dir(&b.dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(have, want, "{}", b.dir.display());
    }
}

/// The content hash as the page describes it, written from the page.
fn page_hash(data: &[u8]) -> u64 {
    const P: u64 = 0x100000001b3;
    let mut lanes: [u64; 4] = [
        0xcbf29ce484222325,
        0x84222325cbf29ce4,
        0x9ce4cbf223258422,
        0x232584229ce4cbf2,
    ];
    let whole = data.len() / 32 * 32;
    for chunk in data[..whole].chunks(32) {
        for (i, lane) in lanes.iter_mut().enumerate() {
            let mut w = 0u64;
            for k in (0..8).rev() {
                w = (w << 8) | u64::from(chunk[8 * i + k]);
            }
            *lane = (*lane ^ w).wrapping_mul(P);
        }
    }
    let mut h = data.len() as u64;
    for lane in lanes {
        h = ((h ^ lane).wrapping_mul(P)).rotate_left(23);
    }
    for &b in &data[whole..] {
        h = (h ^ u64::from(b)).wrapping_mul(P);
    }
    h
}

/// `device-log.json` holds what `device.log` recorded, record for record, with the hash the
/// page's rule computes from each payload, and `seq` is the position.
#[test]
fn device_log_json_is_the_write_log_with_the_page_s_hash() {
    use nbd_server::log::{LogReader, RecordKind as Logged};
    let doc = after("The content hash");
    for s in [
        "0xcbf29ce484222325",
        "0x232584229ce4cbf2",
        "0x100000001b3",
        "23)",
    ] {
        assert!(doc.contains(s), "the page's hash rule no longer says {s}");
    }
    for b in bundles().iter().filter(|b| b.kind == Kind::Race) {
        let json: Vec<serde_json::Value> =
            serde_json::from_str(&std::fs::read_to_string(b.dir.join("device-log.json")).unwrap())
                .unwrap();
        let mut reader = LogReader::open(&b.dir.join("device.log")).unwrap();
        let records: Vec<_> = reader
            .by_ref()
            .map(Result::unwrap)
            .filter(|r| matches!(r.kind, Logged::Write | Logged::Flush | Logged::Trim))
            .collect();
        assert_eq!(records.len(), json.len(), "{}", b.dir.display());
        let bs = BLOCK_SIZE as u64;
        for (i, (r, m)) in records.iter().zip(&json).enumerate() {
            let at = format!("{} record {i}: {m}", b.dir.display());
            assert_eq!(m["seq"], i, "{at}");
            let kind = m["kind"].as_str().unwrap();
            let payload = if r.kind == Logged::Write {
                reader.read_payload(r).unwrap()
            } else {
                vec![]
            };
            let (hash, first) = match payload.first() {
                Some(&f) => (page_hash(&payload), f),
                None => (0, 0),
            };
            assert_eq!(m["hash"].as_u64(), Some(hash), "{at}");
            assert_eq!(m["first_byte"].as_u64(), Some(first.into()), "{at}");
            let (block, count) = match r.kind {
                Logged::Flush => (0, 0),
                _ => (r.header.offset / bs, r.header.length / bs),
            };
            assert_eq!(
                (m["block"].as_u64(), m["count"].as_u64()),
                (Some(block), Some(count)),
                "{at}"
            );
            let want = match (r.kind, r.header.fua()) {
                (Logged::Write, false) => "Write",
                (Logged::Write, true) => "FuaWrite",
                (Logged::Flush, _) => "Flush",
                _ => "Trim",
            };
            assert_eq!(kind, want, "{at}");
        }
    }
}
