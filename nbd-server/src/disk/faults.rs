//! Seeded fault injection: the settings, the generator that decides each request's faults at
//! its arrival, and the records that say so in the write log.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::recorder::Record;
use crate::backend::{Arrival, RequestKind, WriteData};
use crate::log::{encode_payload, FaultKind, FaultPayload, RecordHead, RecordKind};

/// Which faults to inject, and how often. Every decision comes from one ChaCha generator
/// seeded with `seed`, drawn in request-arrival order, so a run with the same requests and
/// seed injects the same faults.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FaultConfig {
    pub seed: u64,
    /// Probability (0..=1) that a READ fails with EIO.
    pub eio_read: f64,
    /// Probability that a WRITE, TRIM or WRITE_ZEROES fails with EIO (and changes nothing).
    pub eio_write: f64,
    /// Probability that a FLUSH fails with EIO (and makes nothing durable).
    pub eio_flush: f64,
    /// Added latency, in microseconds, for a request picked at `latency_rate`.
    pub latency_us: u32,
    pub latency_rate: f64,
}

impl FaultConfig {
    /// Whether any fault can be injected.
    pub fn active(&self) -> bool {
        self.eio_read > 0.0
            || self.eio_write > 0.0
            || self.eio_flush > 0.0
            || (self.latency_us > 0 && self.latency_rate > 0.0)
    }

    /// Checks rates are probabilities.
    pub fn validate(&self) -> Result<(), String> {
        for (name, v) in [
            ("eio-read", self.eio_read),
            ("eio-write", self.eio_write),
            ("eio-flush", self.eio_flush),
            ("latency-rate", self.latency_rate),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(format!("{name}={v} is not a probability in 0..=1"));
            }
        }
        Ok(())
    }
}

/// The fault generator: one seeded ChaCha generator, drawn at each request's arrival.
pub struct Faults {
    config: FaultConfig,
    rng: ChaCha8Rng,
}

/// The faults decided for one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Injected {
    /// The request fails with EIO (and changes nothing).
    pub eio: bool,
    /// Microseconds added before the request runs.
    pub latency_us: u32,
}

impl Faults {
    pub fn new(config: &FaultConfig) -> Self {
        Faults {
            config: config.clone(),
            rng: ChaCha8Rng::seed_from_u64(config.seed),
        }
    }

    /// Decides the faults of a request of `kind`: first EIO (drawn only where its rate is not
    /// zero), then latency (drawn only where configured). The draws are the seeded record of
    /// a run: keep their order.
    pub fn decide(&mut self, kind: RequestKind) -> Injected {
        let f = &self.config;
        let rate = match kind {
            RequestKind::Read => f.eio_read,
            RequestKind::Write | RequestKind::Trim | RequestKind::WriteZeroes => f.eio_write,
            RequestKind::Flush => f.eio_flush,
            _ => 0.0,
        };
        let eio = rate > 0.0 && self.rng.random_bool(rate.min(1.0));
        let late = f.latency_us > 0
            && f.latency_rate > 0.0
            && self.rng.random_bool(f.latency_rate.min(1.0));
        Injected {
            eio,
            latency_us: if late { f.latency_us } else { 0 },
        }
    }
}

/// The fault records of a request that arrived as `a` with faults `injected`, in order.
pub fn fault_records(a: &Arrival, injected: Injected) -> Vec<Record> {
    let request = match a.kind {
        RequestKind::Read => 0,
        RequestKind::Write => RecordKind::Write as u8,
        RequestKind::Trim => RecordKind::Trim as u8,
        RequestKind::WriteZeroes => RecordKind::WriteZeroes as u8,
        RequestKind::Flush => RecordKind::Flush as u8,
        RequestKind::Cache => 8,
        RequestKind::BlockStatus => 9,
    };
    let hits = [
        (injected.eio, FaultKind::Eio),
        (injected.latency_us > 0, FaultKind::Latency),
    ];
    hits.into_iter()
        .filter(|(hit, _)| *hit)
        .map(|(_, fault)| {
            let payload = encode_payload(&FaultPayload {
                fault: fault as u8,
                request,
                latency_us: injected.latency_us,
            });
            Record {
                head: RecordHead {
                    kind: RecordKind::Fault,
                    flags: 0,
                    conn: a.conn,
                    offset: a.offset,
                    length: a.length,
                },
                payload: WriteData::bytes(payload),
            }
        })
        .collect()
}
