//! Client request bytes decoded as Range/Put/DeleteRange/Txn/Compaction and run
//! through the engine's validation and execution (`pgetcd_engine::fuzzing`), or
//! decoded as a WatchRequest and its key span built as the Watch service does.
#![no_main]

use std::cell::RefCell;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use pgetcd_engine::fuzzing::Requests;
use pgetcd_proto::etcdserverpb::{WatchRequest, watch_request::RequestUnion};
use prost::Message;

thread_local! {
    static TARGET: RefCell<Requests> = RefCell::new(Requests::new());
}

fuzz_target!(|data: &[u8]| {
    if let Some((&kind, body)) = data.split_first()
        && kind >= 0xf0
    {
        if let Ok(WatchRequest {
            request_union: Some(RequestUnion::CreateRequest(c)),
        }) = WatchRequest::decode(body)
        {
            let key = if c.key.is_empty() {
                Bytes::from_static(&[0])
            } else {
                c.key.clone()
            };
            let span = pgetcd_watchbus::KeySpan::from_request(&key, &c.range_end);
            let _ = span.is_empty();
        }
        return;
    }
    TARGET.with(|t| t.borrow_mut().run(data));
});
