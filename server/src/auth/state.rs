//! etcd's auth state (the auth flag, users, roles and the auth revision) as a value:
//! its changes with etcd's rules and errors, its encoding in the keyspace, and the
//! permission check over each user's merged key ranges.
//!
//! Every change is applied to a copy (see `Auth::change`), so a failed change leaves
//! nothing behind. The auth revision moves as etcd's does: a fresh state is at 1; every
//! user and role change raises it by one (a grant of a role the user already holds does
//! not); AuthEnable leaves it; AuthDisable raises it when auth was on.

use std::collections::BTreeMap;

use bytes::Bytes;
use pgetcd_proto::authpb::{Permission, Role, User, UserAddOptions, permission::Type};
use prost::Message;
use tonic::{Code, Status};

/// The root user and role of etcd.
pub const ROOT: &str = "root";

/// etcd's auth errors, with its gRPC codes and messages ([`AuthError::status`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthError {
    RootUserNotExist,
    RootRoleNotExist,
    UserAlreadyExist,
    UserEmpty,
    UserNotFound,
    RoleAlreadyExist,
    RoleNotFound,
    RoleEmpty,
    AuthFailed,
    NoPasswordUser,
    PermissionNotGiven,
    PermissionDenied,
    RoleNotGranted,
    PermissionNotGranted,
    AuthNotEnabled,
    InvalidAuthToken,
    InvalidAuthMgmt,
    AuthOldRevision,
}

impl AuthError {
    /// etcd's gRPC status for the error (etcd 3.5's `rpctypes`; an error etcd does not
    /// map, a password given for a user without one, is `Unknown` with its text, as
    /// etcd sends it).
    pub fn status(self) -> Status {
        use AuthError::*;
        let (code, message) = match self {
            RootUserNotExist => (
                Code::FailedPrecondition,
                "etcdserver: root user does not exist",
            ),
            RootRoleNotExist => (
                Code::FailedPrecondition,
                "etcdserver: root user does not have root role",
            ),
            UserAlreadyExist => (
                Code::FailedPrecondition,
                "etcdserver: user name already exists",
            ),
            UserEmpty => (Code::InvalidArgument, "etcdserver: user name is empty"),
            UserNotFound => (Code::FailedPrecondition, "etcdserver: user name not found"),
            RoleAlreadyExist => (
                Code::FailedPrecondition,
                "etcdserver: role name already exists",
            ),
            RoleNotFound => (Code::FailedPrecondition, "etcdserver: role name not found"),
            RoleEmpty => (Code::InvalidArgument, "etcdserver: role name is empty"),
            AuthFailed => (
                Code::InvalidArgument,
                "etcdserver: authentication failed, invalid user ID or password",
            ),
            NoPasswordUser => (
                Code::Unknown,
                "auth: authentication failed, password was given for no password user",
            ),
            PermissionNotGiven => (Code::InvalidArgument, "etcdserver: permission not given"),
            PermissionDenied => (Code::PermissionDenied, "etcdserver: permission denied"),
            RoleNotGranted => (
                Code::FailedPrecondition,
                "etcdserver: role is not granted to the user",
            ),
            PermissionNotGranted => (
                Code::FailedPrecondition,
                "etcdserver: permission is not granted to the role",
            ),
            AuthNotEnabled => (
                Code::FailedPrecondition,
                "etcdserver: authentication is not enabled",
            ),
            InvalidAuthToken => (Code::Unauthenticated, "etcdserver: invalid auth token"),
            InvalidAuthMgmt => (Code::InvalidArgument, "etcdserver: invalid auth management"),
            AuthOldRevision => (
                Code::InvalidArgument,
                "etcdserver: revision of auth store is old",
            ),
        };
        Status::new(code, message)
    }
}

impl From<AuthError> for Status {
    fn from(e: AuthError) -> Status {
        e.status()
    }
}

/// The state as it is kept in the keyspace (`Store::auth`).
#[derive(Clone, PartialEq, prost::Message)]
struct Encoded {
    #[prost(bool, tag = "1")]
    enabled: bool,
    #[prost(uint64, tag = "2")]
    revision: u64,
    #[prost(message, repeated, tag = "3")]
    users: Vec<User>,
    #[prost(message, repeated, tag = "4")]
    roles: Vec<Role>,
    /// The key instances of the keyspace sign forwarded identities with.
    #[prost(bytes = "vec", tag = "5")]
    forward_key: Vec<u8>,
}

/// Read or write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

/// A key range `[begin, end)`; `end` None is unbounded.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Interval {
    begin: Vec<u8>,
    end: Option<Vec<u8>>,
}

impl Interval {
    /// etcd's reading of a permission's or request's range: an empty end is the one
    /// key, `\0` has no end.
    fn of(key: &[u8], range_end: &[u8]) -> Interval {
        let end = match range_end {
            [] => {
                let mut next = key.to_vec();
                next.push(0);
                Some(next)
            }
            [0] => None,
            end => Some(end.to_vec()),
        };
        Interval {
            begin: key.to_vec(),
            end,
        }
    }

    fn is_empty(&self) -> bool {
        self.end.as_ref().is_some_and(|e| *e <= self.begin)
    }
}

/// A union of intervals, sorted and merged.
#[derive(Debug, Clone, Default)]
struct Ranges(Vec<Interval>);

impl Ranges {
    fn build(mut all: Vec<Interval>) -> Ranges {
        all.retain(|i| !i.is_empty());
        all.sort_by(|a, b| a.begin.cmp(&b.begin));
        let mut merged: Vec<Interval> = Vec::with_capacity(all.len());
        for i in all {
            if let Some(last) = merged.last_mut() {
                let touches = match &last.end {
                    None => true,
                    Some(end) => i.begin <= *end,
                };
                if touches {
                    last.end = match (&last.end, &i.end) {
                        (None, _) | (_, None) => None,
                        (Some(a), Some(b)) => Some(a.max(b).clone()),
                    };
                    continue;
                }
            }
            merged.push(i);
        }
        Ranges(merged)
    }

    /// Whether `key` alone lies in the union.
    fn has_key(&self, key: &[u8]) -> bool {
        self.covers(&Interval::of(key, &[]))
    }

    /// Whether the union covers all of `want` (merged intervals never touch, so one
    /// must hold it whole).
    fn covers(&self, want: &Interval) -> bool {
        if want.is_empty() {
            // etcd's interval tree finds nothing to intersect an empty range with.
            return false;
        }
        let at = self.0.partition_point(|i| i.begin <= want.begin);
        let Some(i) = at.checked_sub(1).map(|at| &self.0[at]) else {
            return false;
        };
        match (&i.end, &want.end) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(have), Some(need)) => need <= have,
        }
    }
}

/// One user's permissions, merged over its roles.
#[derive(Debug, Clone, Default)]
struct Merged {
    read: Ranges,
    write: Ranges,
    root: bool,
}

/// The auth state of a keyspace.
#[derive(Debug, Clone)]
pub struct AuthState {
    pub enabled: bool,
    pub revision: u64,
    users: BTreeMap<String, User>,
    roles: BTreeMap<String, Role>,
    forward_key: Vec<u8>,
    merged: BTreeMap<String, Merged>,
}

impl AuthState {
    /// A keyspace's state before anything was written: auth off, revision 1, and a new
    /// forward key.
    pub fn fresh() -> AuthState {
        let mut key = vec![0u8; 32];
        rand::fill(&mut key[..]);
        let mut s = AuthState {
            enabled: false,
            revision: 1,
            users: BTreeMap::new(),
            roles: BTreeMap::new(),
            forward_key: key,
            merged: BTreeMap::new(),
        };
        s.remerge();
        s
    }

    /// The state encoded in `bytes` (an empty record is a fresh state).
    pub fn decode(bytes: &[u8]) -> Result<AuthState, String> {
        if bytes.is_empty() {
            return Ok(AuthState::fresh());
        }
        let e = Encoded::decode(bytes).map_err(|e| format!("auth state unreadable: {e}"))?;
        let mut s = AuthState {
            enabled: e.enabled,
            revision: e.revision,
            users: e
                .users
                .into_iter()
                .map(|u| (String::from_utf8_lossy(&u.name).into_owned(), u))
                .collect(),
            roles: e
                .roles
                .into_iter()
                .map(|r| (String::from_utf8_lossy(&r.name).into_owned(), r))
                .collect(),
            forward_key: e.forward_key,
            merged: BTreeMap::new(),
        };
        if s.forward_key.len() < 16 {
            return Err("auth state has no forward key".to_owned());
        }
        s.remerge();
        Ok(s)
    }

    /// The state as kept in the keyspace.
    pub fn encode(&self) -> Bytes {
        Encoded {
            enabled: self.enabled,
            revision: self.revision,
            users: self.users.values().cloned().collect(),
            roles: self.roles.values().cloned().collect(),
            forward_key: self.forward_key.clone(),
        }
        .encode_to_vec()
        .into()
    }

    /// The key forwarded identities are signed with.
    pub fn forward_key(&self) -> &[u8] {
        &self.forward_key
    }

    /// The user named `name`.
    pub fn user(&self, name: &str) -> Option<&User> {
        self.users.get(name)
    }

    fn remerge(&mut self) {
        let mut merged = BTreeMap::new();
        for (name, user) in &self.users {
            let mut read = Vec::new();
            let mut write = Vec::new();
            let mut root = false;
            for role in &user.roles {
                if role == ROOT {
                    root = true;
                }
                let Some(r) = self.roles.get(role) else {
                    continue;
                };
                for p in &r.key_permission {
                    let ivl = Interval::of(&p.key, &p.range_end);
                    match Type::try_from(p.perm_type) {
                        Ok(Type::Read) => read.push(ivl),
                        Ok(Type::Write) => write.push(ivl),
                        Ok(Type::Readwrite) => {
                            read.push(ivl.clone());
                            write.push(ivl);
                        }
                        Err(_) => {}
                    }
                }
            }
            merged.insert(
                name.clone(),
                Merged {
                    read: Ranges::build(read),
                    write: Ranges::build(write),
                    root,
                },
            );
        }
        self.merged = merged;
    }

    /// Whether `user` holds the root role.
    pub fn is_root(&self, user: &str) -> bool {
        self.merged.get(user).is_some_and(|m| m.root)
    }

    /// Whether `user` holds `role`.
    pub fn has_role(&self, user: &str, role: &str) -> bool {
        self.users
            .get(user)
            .is_some_and(|u| u.roles.iter().any(|r| r == role))
    }

    /// etcd's `isOpPermitted` for a known identity at `revision` (0: none): access to
    /// `[key, range_end)`, or `key` alone when `range_end` is empty.
    pub fn permitted(
        &self,
        user: &str,
        revision: u64,
        key: &[u8],
        range_end: &[u8],
        access: Access,
    ) -> Result<(), AuthError> {
        if !self.enabled {
            return Ok(());
        }
        if revision == 0 {
            return Err(AuthError::UserEmpty);
        }
        if revision < self.revision {
            return Err(AuthError::AuthOldRevision);
        }
        let Some(m) = self.merged.get(user) else {
            return Err(AuthError::PermissionDenied);
        };
        if m.root {
            return Ok(());
        }
        let ranges = match access {
            Access::Read => &m.read,
            Access::Write => &m.write,
        };
        let ok = if range_end.is_empty() {
            ranges.has_key(key)
        } else {
            ranges.covers(&Interval::of(key, range_end))
        };
        if ok {
            Ok(())
        } else {
            Err(AuthError::PermissionDenied)
        }
    }

    /// etcd's `IsAdminPermitted`.
    pub fn admin(&self, user: Option<&str>) -> Result<(), AuthError> {
        if !self.enabled {
            return Ok(());
        }
        let Some(user) = user.filter(|u| !u.is_empty()) else {
            return Err(AuthError::UserEmpty);
        };
        if !self.users.contains_key(user) {
            return Err(AuthError::UserNotFound);
        }
        if !self.is_root(user) {
            return Err(AuthError::PermissionDenied);
        }
        Ok(())
    }

    /// Names of users, ordered as etcd lists them (by bytes).
    pub fn user_names(&self) -> Vec<String> {
        self.users.keys().cloned().collect()
    }

    /// Names of roles, ordered.
    pub fn role_names(&self) -> Vec<String> {
        self.roles.keys().cloned().collect()
    }

    /// The role named `name`.
    pub fn role(&self, name: &str) -> Option<&Role> {
        self.roles.get(name)
    }

    fn bump(&mut self) {
        self.revision += 1;
        self.remerge();
    }

    // The changes. Each returns whether it changed anything (a no-op is not written).

    pub fn enable(&mut self) -> Result<bool, AuthError> {
        if self.enabled {
            return Ok(false);
        }
        let Some(root) = self.users.get(ROOT) else {
            return Err(AuthError::RootUserNotExist);
        };
        if !root.roles.iter().any(|r| r == ROOT) {
            return Err(AuthError::RootRoleNotExist);
        }
        self.enabled = true;
        Ok(true)
    }

    pub fn disable(&mut self) -> Result<bool, AuthError> {
        if !self.enabled {
            return Ok(false);
        }
        self.enabled = false;
        self.bump();
        Ok(true)
    }

    /// Adds a user with the bcrypt hash `password` (None: a user without password).
    pub fn user_add(
        &mut self,
        name: &str,
        password: Option<Vec<u8>>,
        options: Option<UserAddOptions>,
    ) -> Result<bool, AuthError> {
        if name.is_empty() {
            return Err(AuthError::UserEmpty);
        }
        if self.users.contains_key(name) {
            return Err(AuthError::UserAlreadyExist);
        }
        let options = options.unwrap_or_default();
        let password = if options.no_password {
            Bytes::new()
        } else {
            Bytes::from(password.unwrap_or_default())
        };
        self.users.insert(
            name.to_owned(),
            User {
                name: Bytes::copy_from_slice(name.as_bytes()),
                password,
                roles: Vec::new(),
                options: Some(options),
            },
        );
        self.bump();
        Ok(true)
    }

    pub fn user_delete(&mut self, name: &str) -> Result<bool, AuthError> {
        if self.enabled && name == ROOT {
            return Err(AuthError::InvalidAuthMgmt);
        }
        if self.users.remove(name).is_none() {
            return Err(AuthError::UserNotFound);
        }
        self.bump();
        Ok(true)
    }

    /// Sets the bcrypt hash of a user's password (ignored for a user without one).
    pub fn user_change_password(
        &mut self,
        name: &str,
        password: Option<Vec<u8>>,
    ) -> Result<bool, AuthError> {
        let Some(user) = self.users.get_mut(name) else {
            return Err(AuthError::UserNotFound);
        };
        let no_password = user.options.as_ref().is_some_and(|o| o.no_password);
        user.password = if no_password {
            Bytes::new()
        } else {
            Bytes::from(password.unwrap_or_default())
        };
        self.bump();
        Ok(true)
    }

    pub fn user_grant_role(&mut self, user: &str, role: &str) -> Result<bool, AuthError> {
        if !self.users.contains_key(user) {
            return Err(AuthError::UserNotFound);
        }
        if role != ROOT && !self.roles.contains_key(role) {
            return Err(AuthError::RoleNotFound);
        }
        let u = self.users.get_mut(user).ok_or(AuthError::UserNotFound)?;
        match u.roles.binary_search_by(|r| r.as_str().cmp(role)) {
            Ok(_) => return Ok(false),
            Err(at) => u.roles.insert(at, role.to_owned()),
        }
        self.bump();
        Ok(true)
    }

    pub fn user_revoke_role(&mut self, user: &str, role: &str) -> Result<bool, AuthError> {
        if self.enabled && user == ROOT && role == ROOT {
            return Err(AuthError::InvalidAuthMgmt);
        }
        let u = self.users.get_mut(user).ok_or(AuthError::UserNotFound)?;
        let before = u.roles.len();
        u.roles.retain(|r| r != role);
        if u.roles.len() == before {
            return Err(AuthError::RoleNotGranted);
        }
        self.bump();
        Ok(true)
    }

    pub fn role_add(&mut self, name: &str) -> Result<bool, AuthError> {
        if name.is_empty() {
            return Err(AuthError::RoleEmpty);
        }
        if self.roles.contains_key(name) {
            return Err(AuthError::RoleAlreadyExist);
        }
        self.roles.insert(
            name.to_owned(),
            Role {
                name: Bytes::copy_from_slice(name.as_bytes()),
                key_permission: Vec::new(),
            },
        );
        self.bump();
        Ok(true)
    }

    pub fn role_delete(&mut self, name: &str) -> Result<bool, AuthError> {
        if self.enabled && name == ROOT {
            return Err(AuthError::InvalidAuthMgmt);
        }
        if self.roles.remove(name).is_none() {
            return Err(AuthError::RoleNotFound);
        }
        for u in self.users.values_mut() {
            u.roles.retain(|r| r != name);
        }
        self.bump();
        Ok(true)
    }

    pub fn role_grant_permission(
        &mut self,
        name: &str,
        perm: Option<Permission>,
    ) -> Result<bool, AuthError> {
        let Some(perm) = perm else {
            return Err(AuthError::PermissionNotGiven);
        };
        let role = self.roles.get_mut(name).ok_or(AuthError::RoleNotFound)?;
        let perms = &mut role.key_permission;
        let at = perms.partition_point(|p| p.key < perm.key);
        if let Some(p) = perms.get_mut(at)
            && p.key == perm.key
            && p.range_end == perm.range_end
        {
            p.perm_type = perm.perm_type;
        } else {
            perms.push(perm);
            // etcd sorts by key alone, stably.
            perms.sort_by(|a, b| a.key.cmp(&b.key));
        }
        self.bump();
        Ok(true)
    }

    pub fn role_revoke_permission(
        &mut self,
        name: &str,
        key: &[u8],
        range_end: &[u8],
    ) -> Result<bool, AuthError> {
        let role = self.roles.get_mut(name).ok_or(AuthError::RoleNotFound)?;
        let before = role.key_permission.len();
        role.key_permission
            .retain(|p| !(p.key == key && p.range_end == range_end));
        if role.key_permission.len() == before {
            return Err(AuthError::PermissionNotGranted);
        }
        self.bump();
        Ok(true)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn perm(t: Type, key: &str, end: &str) -> Permission {
        Permission {
            perm_type: t as i32,
            key: Bytes::copy_from_slice(key.as_bytes()),
            range_end: Bytes::copy_from_slice(end.as_bytes()),
        }
    }

    fn state() -> AuthState {
        let mut s = AuthState::fresh();
        s.user_add(ROOT, Some(b"x".to_vec()), None).unwrap();
        s.role_add(ROOT).unwrap();
        s.user_grant_role(ROOT, ROOT).unwrap();
        s.user_add("u", Some(b"x".to_vec()), None).unwrap();
        s.role_add("r").unwrap();
        s.role_grant_permission("r", Some(perm(Type::Read, "a", "c")))
            .unwrap();
        s.role_grant_permission("r", Some(perm(Type::Read, "c", "e")))
            .unwrap();
        s.role_grant_permission("r", Some(perm(Type::Readwrite, "k", "")))
            .unwrap();
        s.role_grant_permission("r", Some(perm(Type::Write, "z", "\0")))
            .unwrap();
        s.user_grant_role("u", "r").unwrap();
        s.enable().unwrap();
        s
    }

    #[test]
    fn ranges_merge_and_cover() {
        let s = state();
        let rev = s.revision;
        let ok = |k: &str, e: &str, a| s.permitted("u", rev, k.as_bytes(), e.as_bytes(), a);
        // Adjacent permissions cover a range across them.
        assert_eq!(ok("a", "e", Access::Read), Ok(()));
        assert_eq!(ok("b", "d", Access::Read), Ok(()));
        assert_eq!(ok("a", "f", Access::Read), Err(AuthError::PermissionDenied));
        assert_eq!(ok("d", "", Access::Read), Ok(()));
        assert_eq!(ok("e", "", Access::Read), Err(AuthError::PermissionDenied));
        assert_eq!(ok("a", "", Access::Write), Err(AuthError::PermissionDenied));
        // A single-key permission covers the key and the range [k, k\0).
        assert_eq!(ok("k", "", Access::Write), Ok(()));
        assert_eq!(ok("k", "k\0", Access::Read), Ok(()));
        assert_eq!(ok("k", "l", Access::Read), Err(AuthError::PermissionDenied));
        // An open-ended permission covers every key above.
        assert_eq!(ok("zz", "\0", Access::Write), Ok(()));
        assert_eq!(ok("zzz", "", Access::Write), Ok(()));
        assert_eq!(
            ok("y", "\0", Access::Write),
            Err(AuthError::PermissionDenied)
        );
        // Root may do anything; unknown users nothing; no identity is etcd's error.
        assert_eq!(s.permitted(ROOT, rev, b"q", b"", Access::Write), Ok(()));
        assert_eq!(
            s.permitted("nobody", rev, b"a", b"", Access::Read),
            Err(AuthError::PermissionDenied)
        );
        assert_eq!(
            s.permitted("", 0, b"a", b"", Access::Read),
            Err(AuthError::UserEmpty)
        );
        assert_eq!(
            s.permitted("u", rev - 1, b"a", b"", Access::Read),
            Err(AuthError::AuthOldRevision)
        );
    }

    #[test]
    fn revisions_and_rules_follow_etcd() {
        let mut s = AuthState::fresh();
        assert_eq!(s.revision, 1);
        assert_eq!(s.enable(), Err(AuthError::RootUserNotExist));
        s.user_add(ROOT, None, None).unwrap();
        assert_eq!(s.enable(), Err(AuthError::RootRoleNotExist));
        // The root role needs no RoleAdd to be granted.
        s.user_grant_role(ROOT, ROOT).unwrap();
        assert_eq!(s.revision, 3);
        assert_eq!(s.user_grant_role(ROOT, ROOT), Ok(false));
        assert_eq!(s.revision, 3);
        assert_eq!(s.enable(), Ok(true));
        assert_eq!(s.revision, 3);
        assert_eq!(s.user_delete(ROOT), Err(AuthError::InvalidAuthMgmt));
        assert_eq!(
            s.user_revoke_role(ROOT, ROOT),
            Err(AuthError::InvalidAuthMgmt)
        );
        assert_eq!(s.role_delete(ROOT), Err(AuthError::InvalidAuthMgmt));
        assert_eq!(s.user_add("", None, None), Err(AuthError::UserEmpty));
        assert_eq!(s.role_add(""), Err(AuthError::RoleEmpty));
        assert_eq!(
            s.user_add(ROOT, None, None),
            Err(AuthError::UserAlreadyExist)
        );
        assert_eq!(
            s.user_revoke_role(ROOT, "x"),
            Err(AuthError::RoleNotGranted)
        );
        assert_eq!(s.user_grant_role(ROOT, "x"), Err(AuthError::RoleNotFound));
        assert_eq!(
            s.role_grant_permission("x", None),
            Err(AuthError::PermissionNotGiven)
        );
        assert_eq!(s.disable(), Ok(true));
        assert_eq!(s.revision, 4);
        assert_eq!(s.disable(), Ok(false));
        assert_eq!(s.revision, 4);
    }

    #[test]
    fn encoding_round_trips() {
        let s = state();
        let back = AuthState::decode(&s.encode()).unwrap();
        assert_eq!(back.encode(), s.encode());
        assert!(back.is_root(ROOT));
        assert!(back.has_role("u", "r"));
        assert_eq!(back.role("r").unwrap().key_permission.len(), 4);
        assert!(AuthState::decode(b"\xff\xff").is_err());
    }
}
