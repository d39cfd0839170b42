//! pgoutput messages from the replication stream, as Postgres (or anything on the
//! replication connection) could send them: see `pgetcd_wal::fuzzing`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    pgetcd_wal::fuzzing::decode_messages(data);
});
