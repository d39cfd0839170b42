//! A progress line on stderr, rewritten in place with `\r` a few times per second, and
//! only when stderr is a terminal (redirected output stays clean).

use std::io::{IsTerminal, Write};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const REFRESH: Duration = Duration::from_millis(250);

pub struct Progress {
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Progress {
    /// Shows `line()` until [`Progress::finish`].
    pub fn start(line: impl Fn() -> String + Send + 'static) -> Progress {
        if !std::io::stderr().is_terminal() {
            return Progress {
                stop: None,
                task: None,
            };
        }
        let (stop, mut stopped) = oneshot::channel();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(REFRESH);
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        let mut err = std::io::stderr().lock();
                        let _ = write!(err, "\r\x1b[K{}", line());
                        let _ = err.flush();
                    }
                    _ = &mut stopped => break,
                }
            }
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[K");
            let _ = err.flush();
        });
        Progress {
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Clears the line.
    pub async fn finish(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        // An error path dropped us without finish(): stop the task; the line is
        // cleared by the task itself.
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}
