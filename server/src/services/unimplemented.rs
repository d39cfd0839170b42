//! Services whose every RPC still answers `Unimplemented` (listed in
//! docs/compatibility.md): Auth is not planned yet.
//! The generated default methods return the Unimplemented status.

use pgetcd_proto::etcdserverpb::auth_server::Auth;

/// Auth service placeholder: every RPC answers Unimplemented.
pub struct AuthService;

#[tonic::async_trait]
impl Auth for AuthService {}
