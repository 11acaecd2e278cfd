//! docs/campaigns.md and the code agree: a campaign folder's `campaign.json`, run records and
//! `findings --json` hold exactly the keys of the page's tables, in order; every entry of the
//! `sled` index decodes by the page's byte layouts (written here from the page, not from the
//! code) to what the records and `findings --json` say; the constants the page names are the
//! code's.

use crashmonkey::folder::index::{INDEX_FORMAT, INDEX_LOCK_WAIT_MS_MAX};
use crashmonkey::folder::record::{
    RECORD_SECONDS_DEFAULT, RECORD_VERSION, RUNS_PER_RECORD_MAX, SEEDS_PER_FINDING_LISTED_MAX,
};
use crashmonkey::folder::{BUNDLES_PER_FINDING_MAX, CAMPAIGN_FORMAT};
use crashmonkey::race::campaign::FAILING_SEEDS_LISTED_MAX;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

const DOC: &str = include_str!("../../docs/campaigns.md");

/// The table's keys less those of the other kind of campaign folder (`crash_states`,
/// `minimised_state`, `fs-seed-N/` in a race folder's).
fn keys_but(marker: &str, other: &[&str]) -> Vec<String> {
    let mut k = keys(marker);
    k.retain(|k| !other.contains(&k.as_str()));
    k
}

/// The first column of the table after `<!-- marker -->`, without its backticks.
fn keys(marker: &str) -> Vec<String> {
    let at = DOC
        .find(&format!("<!-- {marker} -->"))
        .unwrap_or_else(|| panic!("docs/campaigns.md has no {marker} table"));
    DOC[at..]
        .lines()
        .skip(3)
        .take_while(|l| l.starts_with('|'))
        .map(|l| {
            l.split('|')
                .nth(1)
                .unwrap()
                .trim()
                .trim_matches('`')
                .to_string()
        })
        .collect()
}

/// JSON as written, objects' keys in their order (serde_json's `Value` sorts them).
#[derive(Debug, Clone)]
enum Ordered {
    Object(Vec<(String, Ordered)>),
    Array(Vec<Ordered>),
    Leaf(serde_json::Value),
}

impl<'de> serde::Deserialize<'de> for Ordered {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Ordered;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("JSON")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> Result<Ordered, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = m.next_entry::<String, Ordered>()? {
                    out.push((k, v));
                }
                Ok(Ordered::Object(out))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut s: A,
            ) -> Result<Ordered, A::Error> {
                let mut out = Vec::new();
                while let Some(v) = s.next_element::<Ordered>()? {
                    out.push(v);
                }
                Ok(Ordered::Array(out))
            }
            fn visit_bool<E>(self, v: bool) -> Result<Ordered, E> {
                Ok(Ordered::Leaf(v.into()))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Ordered, E> {
                Ok(Ordered::Leaf(v.into()))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Ordered, E> {
                Ok(Ordered::Leaf(v.into()))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Ordered, E> {
                Ok(Ordered::Leaf(v.into()))
            }
            fn visit_str<E>(self, v: &str) -> Result<Ordered, E> {
                Ok(Ordered::Leaf(v.into()))
            }
            fn visit_unit<E>(self) -> Result<Ordered, E> {
                Ok(Ordered::Leaf(serde_json::Value::Null))
            }
        }
        d.deserialize_any(V)
    }
}

impl Ordered {
    fn keys(&self) -> Vec<String> {
        match self {
            Ordered::Object(kv) => kv.iter().map(|(k, _)| k.clone()).collect(),
            _ => panic!("not an object: {self:?}"),
        }
    }

    fn get(&self, key: &str) -> &Ordered {
        match self {
            Ordered::Object(kv) => &kv.iter().find(|(k, _)| k == key).unwrap().1,
            _ => panic!("not an object: {self:?}"),
        }
    }

    fn items(&self) -> &[Ordered] {
        match self {
            Ordered::Array(a) => a,
            _ => panic!("not an array: {self:?}"),
        }
    }

    /// Compact JSON, keys in their order.
    fn compact(&self) -> String {
        match self {
            Ordered::Leaf(v) => v.to_string(),
            Ordered::Array(a) => {
                format!(
                    "[{}]",
                    a.iter().map(Ordered::compact).collect::<Vec<_>>().join(",")
                )
            }
            Ordered::Object(kv) => format!(
                "{{{}}}",
                kv.iter()
                    .map(|(k, v)| format!(
                        "{}:{}",
                        serde_json::Value::from(k.as_str()),
                        v.compact()
                    ))
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        }
    }
}

fn ordered(text: &[u8]) -> Ordered {
    serde_json::from_slice(text).unwrap()
}

/// A campaign folder written by this build (serde_json keeps the keys in written order).
fn folder() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("campaigns_doc");
        let _ = std::fs::remove_dir_all(&dir);
        let out = Command::new(env!("CARGO_BIN_EXE_crashmonkey"))
            .args(["race", "--seed", "1", "--runs", "2500", "--no-iomap-valid"])
            .args(["--no-wb-seq-check", "--old-punch", "--json"])
            .args(["--record-seconds", "0.05", "--out"])
            .arg(&dir)
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(1),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        dir
    })
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn records() -> Vec<(String, Vec<u8>, serde_json::Value)> {
    let mut out: Vec<_> = std::fs::read_dir(folder().join("runs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            let v = serde_json::from_slice(&bytes).unwrap();
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                bytes,
                v,
            )
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn findings_bytes() -> Vec<u8> {
    let out = Command::new(env!("CARGO_BIN_EXE_crashmonkey"))
        .args(["findings", "--json"])
        .arg(folder())
        .output()
        .unwrap();
    out.stdout
}

fn findings_json() -> serde_json::Value {
    serde_json::from_slice(&findings_bytes()).unwrap()
}

#[test]
fn files_hold_the_keys_of_their_tables() {
    let text = std::fs::read(folder().join("campaign.json")).unwrap();
    let c = ordered(&text);
    assert_eq!(c.keys(), keys("keys:campaign"));
    assert_eq!(read_json(&folder().join("campaign.json"))["kind"], "race");
    assert_eq!(c.get("params").keys(), keys("keys:params"));
    let recs = records();
    assert!(
        recs.len() >= 2,
        "a 2500-run campaign writes several records"
    );
    for (name, bytes, r) in &recs {
        let o = ordered(bytes);
        assert_eq!(
            o.keys(),
            keys_but("keys:record", &["crash_states"]),
            "{name}"
        );
        for t in o.get("findings").items() {
            assert_eq!(t.keys(), keys("keys:tally"), "{name}");
        }
        // runs/ID-KofN-FIRST.json, FIRST in 20 digits.
        let want = format!(
            "{}-{}-{:020}.json",
            r["campaign"].as_str().unwrap(),
            r["shard"].as_str().unwrap().replace('/', "of"),
            r["first_run"].as_u64().unwrap()
        );
        assert_eq!(name, &want);
    }
    let f = findings_json();
    let o = ordered(&findings_bytes());
    assert_eq!(o.keys(), keys("keys:findings"));
    for x in o.get("findings").items() {
        assert_eq!(x.keys(), keys_but("keys:finding", &["minimised_state"]));
    }
    for x in f["findings"].as_array().unwrap() {
        let fields: Vec<&str> = x["signature"].as_str().unwrap().split('|').collect();
        assert_eq!(fields.len(), 5);
        assert_eq!(fields[0], "race");
        for (i, k) in ["kind", "violation", "lost_by", "switches"]
            .iter()
            .enumerate()
        {
            assert_eq!(x[k], fields[i + 1]);
        }
        assert_eq!(x["bundle"], format!("race-seed-{}", x["smallest_seed"]));
    }
    let layout: Vec<String> = keys_but("layout", &["fs-seed-N/"]);
    let mut have: Vec<String> = std::fs::read_dir(folder())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .map(|n| match n.as_str() {
            "runs" | "index" => format!("{n}/"),
            _ if n.starts_with("race-seed-") => "race-seed-N/".into(),
            _ => n,
        })
        .collect();
    have.sort();
    have.dedup();
    let mut want = layout.clone();
    want.sort();
    assert_eq!(have, want);
}

/// The campaign id as the page defines it.
#[test]
fn the_campaign_id_is_the_page_s() {
    let text = std::fs::read(folder().join("campaign.json")).unwrap();
    let Ordered::Object(mut params) = ordered(&text).get("params").clone() else {
        panic!("params is an object")
    };
    for (k, v) in params.iter_mut() {
        if k == "shard" {
            *v = Ordered::Leaf("".into());
        }
    }
    let hash = blake3::hash(Ordered::Object(params).compact().as_bytes());
    for (_, _, r) in records() {
        assert_eq!(r["campaign"].as_str().unwrap(), &hash.to_hex()[..16]);
    }
}

/// Copies a folder's files and its folders' files (sled's index is two levels deep).
fn copy_dir(from: &Path, to: &Path) {
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        let target = to.join(p.file_name().unwrap());
        if p.is_dir() {
            std::fs::create_dir_all(&target).unwrap();
            for f in std::fs::read_dir(&p).unwrap() {
                let f = f.unwrap().path();
                std::fs::copy(&f, target.join(f.file_name().unwrap())).unwrap();
            }
        } else {
            std::fs::copy(&p, &target).unwrap();
        }
    }
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b.try_into().unwrap())
}

/// Every index entry, decoded by the page's layouts, is what the files say.
#[test]
fn the_index_is_the_page_s_bytes() {
    // A copy: sled locks what it opens, and the other tests read the folder meanwhile.
    let copy = tempfile::tempdir().unwrap();
    copy_dir(&folder().join("index"), copy.path());
    let db = sled::open(copy.path()).unwrap();
    let mut entries = BTreeMap::new();
    for kv in db.iter() {
        let (k, v) = kv.unwrap();
        entries.insert(k.to_vec(), v.to_vec());
    }
    drop(db);
    let mut digest = [0u8; 32];
    let (mut recs, mut finds) = (BTreeMap::new(), BTreeMap::new());
    for (k, v) in &entries {
        if k != b"digest" {
            let mut h = blake3::Hasher::new();
            h.update(&(k.len() as u32).to_be_bytes());
            h.update(k);
            h.update(&(v.len() as u32).to_be_bytes());
            h.update(v);
            digest
                .iter_mut()
                .zip(h.finalize().as_bytes())
                .for_each(|(d, x)| *d ^= x);
        }
        match k.as_slice() {
            b"format" => assert_eq!(v, &1u32.to_be_bytes()),
            b"digest" => {}
            _ if k.starts_with(b"r/") => drop(recs.insert(k[2..].to_vec(), v.clone())),
            _ if k.starts_with(b"f/") => drop(finds.insert(k[2..].to_vec(), v.clone())),
            _ => panic!(
                "a key the page does not have: {:?}",
                String::from_utf8_lossy(k)
            ),
        }
    }
    assert_eq!(entries[&b"digest".to_vec()], digest);
    let files = records();
    assert_eq!(recs.len(), files.len());
    for (name, bytes, r) in &files {
        let v = &recs[name.as_bytes()];
        assert_eq!(v.len(), 56);
        for (i, key) in ["runs", "steps", "failures"].iter().enumerate() {
            assert_eq!(
                be64(&v[8 * i..8 * i + 8]),
                r[key].as_u64().unwrap(),
                "{name} {key}"
            );
        }
        assert_eq!(&v[24..], blake3::hash(bytes).as_bytes());
    }
    let f = findings_json();
    let list = f["findings"].as_array().unwrap();
    assert_eq!(finds.len(), list.len());
    for x in list {
        let v = &finds[x["signature"].as_str().unwrap().as_bytes()];
        let keys = ["count", "first_seed", "smallest_seed", "smallest_steps"];
        for (i, key) in keys.iter().enumerate() {
            assert_eq!(
                be64(&v[8 * i..8 * i + 8]),
                x[key].as_u64().unwrap(),
                "{key}"
            );
        }
        let n = u32::from_be_bytes(v[32..36].try_into().unwrap()) as usize;
        assert_eq!(v.len(), 36 + 8 * n);
        let seeds: Vec<u64> = v[36..].chunks(8).map(be64).collect();
        assert_eq!(serde_json::json!(seeds), x["seeds"]);
    }
}

#[test]
fn constants_on_the_page_are_the_code_s() {
    let doc = DOC.split_whitespace().collect::<Vec<_>>().join(" ");
    for want in [
        format!("at most {BUNDLES_PER_FINDING_MAX} bundles (`BUNDLES_PER_FINDING_MAX`)"),
        format!("at most {RUNS_PER_RECORD_MAX} runs (`RUNS_PER_RECORD_MAX`)"),
        format!("{RECORD_SECONDS_DEFAULT} second of running (`RECORD_SECONDS_DEFAULT`"),
        format!("at most {FAILING_SEEDS_LISTED_MAX} failing seeds (`FAILING_SEEDS_LISTED_MAX`)"),
        format!("at most {SEEDS_PER_FINDING_LISTED_MAX} seeds (`SEEDS_PER_FINDING_LISTED_MAX`)"),
        format!("`{CAMPAIGN_FORMAT}` (`CAMPAIGN_FORMAT`)"),
        format!("`{RECORD_VERSION}` (`RECORD_VERSION`)"),
        format!("`{INDEX_FORMAT}` (`INDEX_FORMAT`)"),
        format!("up to {INDEX_LOCK_WAIT_MS_MAX} ms (`INDEX_LOCK_WAIT_MS_MAX`"),
        format!("the first {FAILING_SEEDS_LISTED_MAX} in run order"),
        format!("at most {SEEDS_PER_FINDING_LISTED_MAX} |"),
    ] {
        assert!(
            doc.contains(&want),
            "docs/campaigns.md does not say {want:?}"
        );
    }
}

/// An fs campaign's folder (`fs campaign --out`, its own section of the page): its
/// `campaign.json`, records, findings and folder hold the keys of the page's tables, its
/// signatures have the page's five fields, and its bundles the page's names.
#[test]
fn an_fs_campaign_folder_holds_the_keys_of_its_tables() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("fs");
    let out = Command::new(env!("CARGO_BIN_EXE_crashmonkey"))
        .args(["fs", "campaign", "--seed", "1", "--runs", "24", "--json"])
        .args(["--bug", "fsync-no-log-force", "--record-seconds", "0.05"])
        .args(["--minimise", "--out"])
        .arg(&dir)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let c = ordered(&std::fs::read(dir.join("campaign.json")).unwrap());
    assert_eq!(c.keys(), keys("keys:campaign"));
    assert_eq!(read_json(&dir.join("campaign.json"))["kind"], "fs");
    assert_eq!(c.get("params").keys(), keys("keys:fs-params"));
    for e in std::fs::read_dir(dir.join("runs")).unwrap() {
        let o = ordered(&std::fs::read(e.unwrap().path()).unwrap());
        assert_eq!(o.keys(), keys("keys:record"));
    }
    let f = Command::new(env!("CARGO_BIN_EXE_crashmonkey"))
        .args(["findings", "--json"])
        .arg(&dir)
        .output()
        .unwrap();
    let o = ordered(&f.stdout);
    assert_eq!(o.keys(), keys("keys:findings"));
    for x in o.get("findings").items() {
        assert_eq!(x.keys(), keys("keys:finding"));
        assert_eq!(x.get("minimised_state").keys(), keys("keys:MinimisedState"));
        assert_eq!(
            x.get("minimised_state").get("after").keys(),
            keys("keys:StateSize")
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&f.stdout).unwrap();
    for x in v["findings"].as_array().unwrap() {
        let fields: Vec<&str> = x["signature"].as_str().unwrap().split('|').collect();
        assert_eq!(fields.len(), 5);
        assert_eq!(fields[..2], ["fs", "crash_state"]);
        assert!(fields[2].starts_with("fsck=") || fields[2].starts_with("mount="));
        assert_eq!(x["bundle"], format!("fs-seed-{}", x["smallest_seed"]));
        let min = format!("fs-seed-{}/minimised", x["smallest_seed"]);
        assert_eq!(x["minimised_state"]["bundle"], min.as_str());
    }
    let mut have: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .map(|n| match n.as_str() {
            "runs" | "index" => format!("{n}/"),
            _ if n.starts_with("fs-seed-") => "fs-seed-N/".into(),
            _ => n,
        })
        .collect();
    have.sort();
    have.dedup();
    let mut want = keys_but("layout", &["race-seed-N/"]);
    want.sort();
    assert_eq!(have, want);
}
