//! The core of the `requests` fuzz target (`fuzz/fuzz_targets/requests.rs`), here so
//! that ordinary tests run it too (`engine/tests/fuzz_requests.rs`: seeded random and
//! mutated requests, no nightly toolchain).
//!
//! Input: the first byte picks a request type (Range, Put, DeleteRange, Txn,
//! Compaction), the rest is decoded as that protobuf message, as the gRPC layer would
//! decode a client's bytes. Messages that decode go through the engine, validation
//! first, over an in-memory store (a fresh one every [`RESET_EVERY`] inputs, so memory
//! stays bounded). The engine must answer (a response or an etcd error), never panic
//! or hang.

use std::sync::Arc;

use pgetcd_proto::etcdserverpb::{
    CompactionRequest, DeleteRangeRequest, PutRequest, RangeRequest, TxnRequest,
};
use pgetcd_storage::memory::MemoryStore;
use prost::Message;

use crate::{Engine, EngineConfig};

/// Inputs served by one engine before a fresh one replaces it.
pub const RESET_EVERY: u32 = 2048;

/// An engine over an in-memory store and a runtime to drive it.
pub struct Requests {
    runtime: tokio::runtime::Runtime,
    engine: Option<Engine>,
    served: u32,
}

impl Default for Requests {
    fn default() -> Self {
        Self::new()
    }
}

impl Requests {
    /// A runtime of one thread; the engine is opened at the first input.
    pub fn new() -> Requests {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a current-thread runtime builds");
        Requests {
            runtime,
            engine: None,
            served: 0,
        }
    }

    /// Decodes `data` as one request and runs it; returns whether it decoded.
    pub fn run(&mut self, data: &[u8]) -> bool {
        let Some((&kind, body)) = data.split_first() else {
            return false;
        };
        if self.served.is_multiple_of(RESET_EVERY) {
            self.engine = None;
        }
        self.served = self.served.wrapping_add(1);
        let engine = match &self.engine {
            Some(e) => e.clone(),
            None => {
                let config = EngineConfig {
                    cache_bytes: 1 << 16,
                    ..EngineConfig::default()
                };
                let store = Arc::new(MemoryStore::new("fuzz"));
                let e = self
                    .runtime
                    .block_on(Engine::open(config, store))
                    .expect("an engine opens over a memory store");
                self.engine = Some(e.clone());
                e
            }
        };
        let ran = async {
            match kind % 5 {
                0 => match RangeRequest::decode(body) {
                    Ok(r) => {
                        let _ = engine.range(&r).await;
                        true
                    }
                    Err(_) => false,
                },
                1 => match PutRequest::decode(body) {
                    Ok(r) => {
                        let _ = engine.put(r).await;
                        true
                    }
                    Err(_) => false,
                },
                2 => match DeleteRangeRequest::decode(body) {
                    Ok(r) => {
                        let _ = engine.delete_range(r).await;
                        true
                    }
                    Err(_) => false,
                },
                3 => match TxnRequest::decode(body) {
                    Ok(r) => {
                        let _ = engine.txn(r).await;
                        true
                    }
                    Err(_) => false,
                },
                _ => match CompactionRequest::decode(body) {
                    Ok(r) => {
                        let _ = engine.compact(r).await;
                        true
                    }
                    Err(_) => false,
                },
            }
        };
        let limit = std::time::Duration::from_secs(10);
        self.runtime
            .block_on(async { tokio::time::timeout(limit, ran).await })
            .expect("the engine answers every request within 10 s")
    }
}
