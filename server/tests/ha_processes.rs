//! Three pgetcd processes on one keyspace under write load: the writer is killed with
//! SIGKILL five times (`PGETCD_HA_KILLS`; and restarted, as a follower), then paused with SIGSTOP until
//! another instance takes over and resumed. Every acknowledged write must be there at
//! its revision, revisions must be unique, and the paused writer must answer nothing
//! stale and commit nothing once resumed. Prints the take-over times.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use pgetcd_proto::etcdserverpb::{
    MemberListRequest, PutRequest, RangeRequest, StatusRequest, cluster_client::ClusterClient,
    kv_client::KvClient, maintenance_client::MaintenanceClient,
};
use pgetcd_testkit::{fresh_keyspace, postgres_url};
use tonic::transport::{Channel, Endpoint};

struct Instance {
    name: String,
    url: String,
    metrics: u16,
    child: Option<Child>,
}

impl Instance {
    fn start(&mut self, keyspace: &str) {
        let child = Command::new(env!("CARGO_BIN_EXE_pgetcd"))
            .args(["--name", &self.name])
            .args(["--postgres-url", &postgres_url()])
            .args(["--keyspace", keyspace])
            .args(["--listen-client-urls", &self.url])
            .args(["--advertise-client-urls", &self.url])
            .args([
                "--listen-metrics-urls",
                &format!("http://127.0.0.1:{}", self.metrics),
            ])
            .args(["--read-pool-size", "2"])
            .env("PGETCD_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig} {}", self.pid());
    }

    fn kill(&mut self) {
        self.signal("-KILL");
        let _ = self.child.take().unwrap().wait();
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn channel(url: &str) -> Channel {
    Endpoint::from_shared(url.to_owned())
        .unwrap()
        .connect_timeout(Duration::from_millis(500))
        .timeout(Duration::from_secs(3))
        .connect_lazy()
}

async fn wait_serving(url: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = KvClient::new(channel(url))
            .range(RangeRequest {
                key: Bytes::from_static(b"/"),
                serializable: true,
                ..Default::default()
            })
            .await;
        if r.is_ok() {
            return;
        }
        assert!(Instant::now() < deadline, "{url} did not serve: {r:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The name of the instance that writes now, as `url`'s instance sees it.
async fn writer_name(url: &str) -> Option<String> {
    let status = MaintenanceClient::new(channel(url))
        .status(StatusRequest::default())
        .await
        .ok()?
        .into_inner();
    let members = ClusterClient::new(channel(url))
        .member_list(MemberListRequest::default())
        .await
        .ok()?
        .into_inner()
        .members;
    members
        .into_iter()
        .find(|m| m.id == status.leader && status.leader != 0)
        .map(|m| m.name)
}

type Acked = Arc<Mutex<BTreeMap<String, i64>>>;

/// Puts distinct keys round-robin over `urls` until `stop`; records what was
/// acknowledged, and when the last acknowledgement came.
async fn load(
    urls: Vec<String>,
    acked: Acked,
    last_ack: Arc<Mutex<Instant>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    let clients: Vec<KvClient<Channel>> = urls.iter().map(|u| KvClient::new(channel(u))).collect();
    let mut i = 0usize;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let key = format!("/load/{i:06}");
        let mut c = clients[i % clients.len()].clone();
        let r = c
            .put(PutRequest {
                key: Bytes::from(key.clone()),
                value: Bytes::from_static(b"v"),
                ..Default::default()
            })
            .await;
        match r {
            Ok(resp) => {
                acked
                    .lock()
                    .insert(key, resp.into_inner().header.unwrap().revision);
                *last_ack.lock() = Instant::now();
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
        i += 1;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_writer_killed_five_times_and_paused_once_loses_nothing() {
    let keyspace = fresh_keyspace();
    let mut instances: Vec<Instance> = (0..3)
        .map(|i| Instance {
            name: format!("n{i}"),
            url: format!("http://127.0.0.1:{}", pgetcd_localpg::free_port().unwrap()),
            metrics: pgetcd_localpg::free_port().unwrap(),
            child: None,
        })
        .collect();
    for inst in &mut instances {
        inst.start(&keyspace);
        wait_serving(&inst.url).await;
    }
    let urls: Vec<String> = instances.iter().map(|i| i.url.clone()).collect();
    let acked: Acked = Arc::default();
    let last_ack = Arc::new(Mutex::new(Instant::now()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load_task = tokio::spawn(load(
        urls.clone(),
        acked.clone(),
        last_ack.clone(),
        stop.clone(),
    ));

    let mut take_overs = Vec::new();
    // PGETCD_HA_KILLS=N kills the writer N times instead (to measure the distribution).
    let kills: usize = std::env::var("PGETCD_HA_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    for round in 0..kills {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let name = writer_name(&urls[round % 3]).await.expect("a writer");
        let victim = instances.iter().position(|i| i.name == name).unwrap();
        let killed = Instant::now();
        instances[victim].kill();
        // Until a write sent after the kill, through a surviving instance, is
        // acknowledged.
        let survivor = &instances[(victim + 1) % 3].url;
        let mut kv = KvClient::new(channel(survivor));
        let took = loop {
            let r = kv
                .put(PutRequest {
                    key: Bytes::from(format!("/probe/{round}")),
                    value: Bytes::from_static(b"v"),
                    ..Default::default()
                })
                .await;
            if let Ok(resp) = r {
                let rev = resp.into_inner().header.unwrap().revision;
                acked.lock().insert(format!("/probe/{round}"), rev);
                break killed.elapsed();
            }
            assert!(
                killed.elapsed() < Duration::from_secs(15),
                "round {round}: no take-over"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        take_overs.push(took);
        instances[victim].start(&keyspace);
        wait_serving(&instances[victim].url).await;
    }

    // Pause the writer until another instance writes, then resume it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let name = writer_name(&urls[0]).await.expect("a writer");
    let paused = instances.iter().position(|i| i.name == name).unwrap();
    instances[paused].signal("-STOP");
    let stopped_at = Instant::now();
    let before = acked.lock().len();
    loop {
        if *last_ack.lock() > stopped_at + Duration::from_millis(100) && acked.lock().len() > before
        {
            break;
        }
        assert!(
            stopped_at.elapsed() < Duration::from_secs(15),
            "no take-over from a paused writer"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let other = (paused + 1) % 3;
    let mut kv_other = KvClient::new(channel(&instances[other].url));
    let fresh = loop {
        let r = kv_other
            .put(PutRequest {
                key: Bytes::from_static(b"/fresh"),
                value: Bytes::from_static(b"after the pause"),
                ..Default::default()
            })
            .await;
        match r {
            Ok(resp) => break resp.into_inner().header.unwrap().revision,
            Err(e) => {
                assert!(stopped_at.elapsed() < Duration::from_secs(20), "{e:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    instances[paused].signal("-CONT");
    // Straight after resuming: a linearizable read is refused or fresh, never stale.
    let got = KvClient::new(channel(&instances[paused].url))
        .range(RangeRequest {
            key: Bytes::from_static(b"/fresh"),
            ..Default::default()
        })
        .await;
    match got {
        Ok(r) => {
            let r = r.into_inner();
            assert_eq!(
                r.kvs.len(),
                1,
                "a stale read from the resumed writer (revision {})",
                r.header.unwrap().revision
            );
            assert_eq!(r.kvs[0].mod_revision, fresh);
        }
        Err(status) => println!("resumed writer refused a linearizable read: {status:?}"),
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    load_task.await.unwrap();

    // Everything acknowledged is there at its revision, on every instance; revisions
    // were never assigned twice.
    let acked = acked.lock().clone();
    let mut revs: Vec<i64> = acked.values().copied().collect();
    revs.sort();
    let n = revs.len();
    revs.dedup();
    assert_eq!(revs.len(), n, "a revision acknowledged twice");
    for inst in &instances {
        wait_serving(&inst.url).await;
        let kvs = KvClient::new(channel(&inst.url))
            .max_decoding_message_size(usize::MAX)
            .range(RangeRequest {
                key: Bytes::from_static(b"/"),
                range_end: Bytes::from_static(b"0"),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .kvs;
        let found: BTreeMap<String, i64> = kvs
            .into_iter()
            .map(|kv| (String::from_utf8(kv.key.to_vec()).unwrap(), kv.mod_revision))
            .collect();
        for (k, rev) in &acked {
            assert_eq!(found.get(k), Some(rev), "{} lost {k}", inst.name);
        }
    }
    take_overs.sort();
    println!(
        "take-over after SIGKILL of the writer, {} kills: min {:?}, p50 {:?}, max {:?}; {} writes acknowledged",
        take_overs.len(),
        take_overs[0],
        take_overs[take_overs.len() / 2],
        take_overs[take_overs.len() - 1],
        n
    );
    assert!(take_overs[take_overs.len() - 1] < Duration::from_secs(6));
}
