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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::decode_payload;

    const KINDS: [RequestKind; 7] = [
        RequestKind::Read,
        RequestKind::Write,
        RequestKind::Trim,
        RequestKind::WriteZeroes,
        RequestKind::Flush,
        RequestKind::Cache,
        RequestKind::BlockStatus,
    ];

    /// Each EIO rate applies to its own requests only: reads, changes, flushes; CACHE and
    /// BLOCK_STATUS never fail. A rate of 1 always fails, 0 never.
    #[test]
    fn each_eio_rate_fails_its_own_requests() {
        type Set = fn(&mut FaultConfig);
        let cases: [(Set, &[RequestKind]); 3] = [
            (|c| c.eio_read = 1.0, &[RequestKind::Read]),
            (
                |c| c.eio_write = 1.0,
                &[
                    RequestKind::Write,
                    RequestKind::Trim,
                    RequestKind::WriteZeroes,
                ],
            ),
            (|c| c.eio_flush = 1.0, &[RequestKind::Flush]),
        ];
        for (set, failing) in cases {
            let mut config = FaultConfig::default();
            set(&mut config);
            assert!(config.active());
            let mut faults = Faults::new(&config);
            for kind in KINDS {
                let got = faults.decide(kind);
                let want = Injected {
                    eio: failing.contains(&kind),
                    latency_us: 0,
                };
                assert_eq!(got, want, "{kind:?} with {config:?}");
            }
        }
    }

    /// Latency needs both a duration and a rate; either alone injects nothing.
    #[test]
    fn latency_needs_a_duration_and_a_rate() {
        let both = FaultConfig {
            latency_us: 7,
            latency_rate: 1.0,
            ..FaultConfig::default()
        };
        assert!(both.active());
        assert_eq!(Faults::new(&both).decide(RequestKind::Read).latency_us, 7);
        for config in [
            FaultConfig {
                latency_rate: 0.0,
                ..both.clone()
            },
            FaultConfig {
                latency_us: 0,
                ..both.clone()
            },
            FaultConfig::default(),
        ] {
            assert!(!config.active(), "{config:?}");
            let got = Faults::new(&config).decide(RequestKind::Write);
            assert_eq!(got, Injected::default(), "{config:?}");
        }
    }

    /// The same seed draws the same faults; rates in between fail some requests and not
    /// others, near their rate.
    #[test]
    fn decisions_follow_the_seed_and_the_rate() {
        let config = FaultConfig {
            seed: 9,
            eio_write: 0.25,
            latency_us: 3,
            latency_rate: 0.5,
            ..FaultConfig::default()
        };
        let draw = |config: &FaultConfig| {
            let mut f = Faults::new(config);
            (0..4000)
                .map(|_| f.decide(RequestKind::Write))
                .collect::<Vec<_>>()
        };
        let a = draw(&config);
        assert_eq!(a, draw(&config));
        assert_ne!(
            a,
            draw(&FaultConfig {
                seed: 10,
                ..config.clone()
            })
        );
        let eio = a.iter().filter(|i| i.eio).count();
        let late = a.iter().filter(|i| i.latency_us == 3).count();
        assert!((800..1200).contains(&eio), "{eio} of 4000 at 0.25");
        assert!((1800..2200).contains(&late), "{late} of 4000 at 0.5");
        // No EIO draw where the rate is 0: the latency decisions are the generator's own
        // sequence (recorded runs replay only if the draws keep their order).
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let mut f = Faults::new(&config);
        for i in 0..200 {
            let want = rng.random_bool(0.5);
            assert_eq!(f.decide(RequestKind::Read).latency_us > 0, want, "read {i}");
        }
        // Nor a latency draw where latency is half set up (a duration or a rate of 0).
        for (latency_us, latency_rate) in [(0, 0.5), (5, 0.0)] {
            let config = FaultConfig {
                seed: 9,
                eio_read: 0.5,
                latency_us,
                latency_rate,
                ..FaultConfig::default()
            };
            let mut rng = ChaCha8Rng::seed_from_u64(9);
            let mut f = Faults::new(&config);
            for i in 0..200 {
                let want = rng.random_bool(0.5);
                assert_eq!(
                    f.decide(RequestKind::Read).eio,
                    want,
                    "{config:?}: read {i}"
                );
            }
        }
    }

    /// A request's fault records, as docs/write-log.md lays them out: EIO before latency, the
    /// request's connection, offset and length, and its kind code (0 read, the record kind
    /// for changes and flushes, 8 cache, 9 block-status).
    #[test]
    fn fault_records_name_the_request_and_its_faults() {
        let codes = [0u8, 1, 2, 3, 4, 8, 9];
        for (kind, code) in KINDS.into_iter().zip(codes) {
            let a = Arrival {
                conn: 5,
                kind,
                offset: 4096,
                length: 512,
                fua: false,
            };
            let injected = Injected {
                eio: true,
                latency_us: 11,
            };
            let records = fault_records(&a, injected);
            let mut faults = Vec::new();
            for r in &records {
                let h = &r.head;
                assert_eq!(h.kind, RecordKind::Fault);
                assert_eq!((h.flags, h.conn, h.offset, h.length), (0, 5, 4096, 512));
                let p: FaultPayload = decode_payload(&r.payload.to_vec()).unwrap();
                assert_eq!((p.request, p.latency_us), (code, 11), "{kind:?}");
                faults.push(p.fault);
            }
            assert_eq!(faults, [FaultKind::Eio as u8, FaultKind::Latency as u8]);
            assert_eq!((FaultKind::Eio as u8, FaultKind::Latency as u8), (1, 2));
        }
        let a = Arrival {
            conn: 1,
            kind: RequestKind::Read,
            offset: 0,
            length: 1,
            fua: false,
        };
        assert!(fault_records(&a, Injected::default()).is_empty());
        let late = Injected {
            eio: false,
            latency_us: 4,
        };
        assert_eq!(fault_records(&a, late).len(), 1);
    }
}
