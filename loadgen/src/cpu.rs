//! Server CPU time from /proc, read before and after a round. Meaningful only when the
//! servers run on this machine. Two ways to say which processes are the server:
//! - by command name (`--cpu-comm pgetcd,postgres`): utime+stime of every live process
//!   with that name (on a shared machine that includes other people's servers);
//! - by process id (`--cpu-pid`): the process and all its descendants, each with
//!   utime+stime+cutime+cstime, so that children which exited during the round (Postgres
//!   backends) still count, once, through their parent's cutime/cstime.

const TICKS_PER_SEC: f64 = 100.0;

/// Which processes count as the server.
#[derive(Clone, Debug)]
pub enum Source {
    Names(Vec<String>),
    Pids(Vec<u32>),
}

impl Source {
    /// `pids` ("123,456") when given, else the names ("a,b").
    pub fn parse(names: &str, pids: Option<&str>) -> anyhow::Result<Source> {
        if let Some(p) = pids {
            let pids = p
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| {
                    s.parse()
                        .map_err(|_| anyhow::anyhow!("not a process id: {s:?}"))
                })
                .collect::<anyhow::Result<Vec<u32>>>()?;
            return Ok(Source::Pids(pids));
        }
        Ok(Source::Names(
            names
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect(),
        ))
    }
}

struct Proc {
    pid: u32,
    ppid: u32,
    comm: String,
    /// utime, stime, cutime, cstime.
    times: [u64; 4],
}

fn parse_stat(stat: &str) -> Option<Proc> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let pid = stat.get(..open)?.trim().parse().ok()?;
    let comm = stat.get(open + 1..close)?.to_owned();
    let fields: Vec<&str> = stat.get(close + 2..)?.split(' ').collect();
    // After "pid (comm) ": state 0, ppid 1, ..., utime 11, stime 12, cutime 13, cstime 14.
    let num = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Some(Proc {
        pid,
        ppid: num(1) as u32,
        comm,
        times: [num(11), num(12), num(13), num(14)],
    })
}

fn processes() -> Option<Vec<Proc>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        if let Ok(stat) = std::fs::read_to_string(e.path().join("stat"))
            && let Some(p) = parse_stat(&stat)
        {
            out.push(p);
        }
    }
    Some(out)
}

/// CPU clock ticks used so far by the processes `src` names.
pub fn cpu_ticks(src: &Source) -> Option<u64> {
    match src {
        Source::Names(names) if names.is_empty() => None,
        Source::Pids(pids) if pids.is_empty() => None,
        Source::Names(names) => Some(
            processes()?
                .iter()
                .filter(|p| names.contains(&p.comm))
                .map(|p| p.times[0] + p.times[1])
                .sum(),
        ),
        Source::Pids(roots) => {
            let all = processes()?;
            let mut tree: Vec<u32> = roots.clone();
            let mut i = 0;
            while i < tree.len() {
                let parent = tree[i];
                tree.extend(all.iter().filter(|p| p.ppid == parent).map(|p| p.pid));
                i += 1;
            }
            Some(
                all.iter()
                    .filter(|p| tree.contains(&p.pid))
                    .map(|p| p.times.iter().sum::<u64>())
                    .sum(),
            )
        }
    }
}

/// Server CPU microseconds per operation between two tick readings.
pub fn cpu_per_op(before: Option<u64>, after: Option<u64>, ops: u64) -> Option<f64> {
    match (before, after) {
        (Some(a), Some(b)) if ops > 0 => {
            Some(b.saturating_sub(a) as f64 / TICKS_PER_SEC * 1e6 / ops as f64)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_lines() {
        let p = parse_stat("42 (post gres) S 7 42 42 0 -1 4194560 1 0 0 0 11 22 33 44 20 0")
            .expect("parses");
        assert_eq!((p.pid, p.ppid, p.comm.as_str()), (42, 7, "post gres"));
        assert_eq!(p.times, [11, 22, 33, 44]);
    }

    #[test]
    fn own_process_tree_has_ticks() {
        let me = std::process::id();
        assert!(cpu_ticks(&Source::Pids(vec![me])).is_some());
        assert!(cpu_ticks(&Source::Names(vec![])).is_none());
    }
}
