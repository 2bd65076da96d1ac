//! A thread of its own for one plugin instance's recurring calls (a collector's `collect`, a
//! sink's `write`).
//!
//! Why not tokio's blocking pool, where these calls ran before: glibc gives every thread that
//! allocates a malloc arena of its own, and memory freed into an arena stays resident in it.
//! On the pool, each cycle's calls landed on whichever pool thread woke first, a new pool
//! thread (and arena) appeared whenever two calls overlapped, and every arena grew towards the
//! whole cycle's allocation pattern: the agent's memory crept up for hours at a 1 s interval
//! (docs/benchmarks-history.md, "Flat memory"). One thread per instance keeps each plugin's
//! allocations in one arena, with the same pattern every cycle, and a call that hangs holds only
//! its own instance's thread.
//!
//! Calls on one thread run one after another, in order. The host never overlaps two calls of
//! one instance anyway (the scheduler and the sink worker wait for the call in flight).

use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::mpsc;
use std::task::{Context, Poll};

use metricsd_plugin_api::panic_message;
use tokio::sync::oneshot;

type Job = Box<dyn FnOnce() + Send>;

/// Where one instance's calls run: its own thread, or tokio's blocking pool when the system
/// refused a thread (logged once, at creation).
pub struct CallThread {
    jobs: Option<mpsc::Sender<Job>>,
}

/// Why a call gave no result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallFailed(pub String);

impl std::fmt::Display for CallFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A call in flight: resolves when the function has returned (or panicked).
pub struct Call<R>(oneshot::Receiver<Result<R, String>>);

impl<R> Future for Call<R> {
    type Output = Result<R, CallFailed>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0)
            .poll(cx)
            .map(|received| match received {
                Ok(Ok(value)) => Ok(value),
                Ok(Err(panic)) => Err(CallFailed(format!("the call panicked: {panic}"))),
                Err(_) => Err(CallFailed("the call's thread is gone".to_string())),
            })
    }
}

/// Linux keeps 15 bytes of a thread's name; cut at a character boundary.
fn thread_name(name: &str) -> String {
    let mut end = name.len().min(15);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    name[..end].to_string()
}

impl CallThread {
    /// Starts the thread, named `name` (as `top -H` and `/proc/PID/task/*/comm` show it). It
    /// ends when this value is dropped and the calls queued before have run.
    pub fn spawn(name: &str) -> Self {
        let (tx, rx) = mpsc::channel::<Job>();
        let spawned = std::thread::Builder::new()
            .name(thread_name(name))
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    job();
                }
            });
        match spawned {
            Ok(_) => Self { jobs: Some(tx) },
            Err(e) => {
                tracing::warn!(
                    "cannot start a thread for `{name}` ({e}); its calls share the runtime's \
                     blocking threads instead"
                );
                Self { jobs: None }
            }
        }
    }

    /// Runs `f` on the thread. A panic in `f` is caught there and comes back as an error; the
    /// thread goes on with the next call.
    pub fn call<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> Call<R> {
        let (tx, rx) = oneshot::channel();
        let job = move || {
            let result = catch_unwind(AssertUnwindSafe(f)).map_err(|p| panic_message(&*p));
            // The caller may have stopped waiting (shutdown): nothing to tell then.
            let _ = tx.send(result);
        };
        match &self.jobs {
            // A send fails only if the thread is gone: the job, and with it `tx`, is dropped
            // and the call resolves to "gone".
            Some(jobs) => drop(jobs.send(Box::new(job))),
            None => drop(tokio::task::spawn_blocking(job)),
        }
        Call(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn calls_run_in_order_on_one_named_thread() {
        let t = CallThread::spawn("collect-gpu");
        let first = t.call(|| std::thread::current().name().map(str::to_string));
        let second = t.call(|| std::thread::current().id());
        let third = t.call(|| std::thread::current().id());
        assert_eq!(first.await, Ok(Some("collect-gpu".to_string())));
        assert_eq!(second.await, third.await);
    }

    #[tokio::test]
    async fn a_panic_is_an_error_and_the_thread_goes_on() {
        let t = CallThread::spawn("p");
        let failed = t.call(|| -> u32 { panic!("boom") }).await;
        assert_eq!(
            failed,
            Err(CallFailed("the call panicked: boom".to_string()))
        );
        assert_eq!(t.call(|| 7).await, Ok(7));
    }

    #[tokio::test]
    async fn a_hanging_call_holds_only_its_own_thread() {
        let hung = CallThread::spawn("hung");
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let stuck = hung.call(move || wait.recv().is_ok());
        let other = CallThread::spawn("other");
        assert_eq!(other.call(|| 1).await, Ok(1));
        release.send(()).expect("the hung call waits");
        assert_eq!(stuck.await, Ok(true));
    }

    #[test]
    fn long_names_are_cut_to_what_linux_keeps() {
        assert_eq!(thread_name("write-prometheus-remote"), "write-prometheu");
        assert_eq!(thread_name("collect-ééééééééé"), "collect-ééé");
        assert_eq!(thread_name("gpu"), "gpu");
    }
}
