//! etcd's authentication and authorisation, being built (issue #15): the auth state
//! with etcd's rules, errors and revisions ([`state`]), and its tokens ([`tokens`]).
//! The state is kept in the keyspace through `Store::auth`/`Store::swap_auth`.
//! Not yet wired: the Auth service still answers `Unimplemented` and no RPC checks
//! permissions (docs/compatibility.md).

/// The auth state: users, roles, the auth flag and revision, permission checks.
pub mod state;
/// Simple and JWT tokens (`--auth-token`).
pub mod tokens;
