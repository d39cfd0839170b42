//! The etcd v3 API as Rust types: `mvccpb` (key-values and events), `authpb`, and
//! `etcdserverpb` (requests, responses and, with the `grpc` feature, the tonic services
//! and clients).
//!
//! The .proto files under `proto/` are pgetcd's own; package, service, message names and
//! field numbers match etcd's wire protocol exactly, which is what makes pgetcd a drop-in
//! endpoint. `bytes` fields are `bytes::Bytes` so that values move through the server
//! without copies.

#![allow(clippy::all, clippy::pedantic)]

/// Key-values and watch events.
pub mod mvccpb {
    include!(concat!(env!("OUT_DIR"), "/mvccpb.rs"));
    #[cfg(feature = "json")]
    include!(concat!(env!("OUT_DIR"), "/mvccpb.serde.rs"));
}

/// Users, roles and permissions.
pub mod authpb {
    include!(concat!(env!("OUT_DIR"), "/authpb.rs"));
    #[cfg(feature = "json")]
    include!(concat!(env!("OUT_DIR"), "/authpb.serde.rs"));
}

/// Requests, responses and services of the etcd v3 gRPC API.
pub mod etcdserverpb {
    include!(concat!(env!("OUT_DIR"), "/etcdserverpb.rs"));
    #[cfg(feature = "json")]
    include!(concat!(env!("OUT_DIR"), "/etcdserverpb.serde.rs"));
}
