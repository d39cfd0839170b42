//! Services whose every RPC still answers `Unimplemented` (listed in
//! docs/compatibility.md): Lease is being built, Auth is not planned yet.
//! The generated default methods return the Unimplemented status.

use pgetcd_proto::etcdserverpb::{auth_server::Auth, lease_server::Lease};

/// Lease service placeholder: every RPC answers Unimplemented.
pub struct LeaseService;
/// Auth service placeholder: every RPC answers Unimplemented.
pub struct AuthService;

#[tonic::async_trait]
impl Lease for LeaseService {}
#[tonic::async_trait]
impl Auth for AuthService {}
