//! The data plane's workers: one single-threaded tokio runtime per core, nothing shared on the
//! hot path.
//!
//! A client connection is handed to one worker when it is accepted and stays there: its HTTP/2
//! connection task, the tasks of its calls and the upstream connections those calls lease (the
//! relay's pools keep one shard per worker, see `relay::up`) all run on that worker's thread. So a
//! call never wakes another thread, and because a single-threaded runtime runs woken tasks in
//! the order they were woken (there is no "run the task just woken first" slot as in tokio's
//! work-stealing scheduler), the frames that many calls queue on one HTTP/2 connection in one
//! turn of the event loop leave in one write rather than one write each. This is the model of
//! Envoy's and HAProxy's worker threads, and of pingora's no-steal runtimes.
//!
//! Worker 0 is the runtime that `app::run` drives on the main thread (it also runs the
//! listeners and the datapath heartbeat); workers 1..n run on threads of their own until
//! [`Workers::stop`].
//!
//! Invariant: a connection's tasks are spawned with `tokio::spawn` from the worker that runs the
//! connection, so they stay on it; [`current`] names that worker for the pool shards. How many
//! workers there are is [`Workers::count`], passed to what keeps a shard per worker: no
//! process-wide count, so nothing depends on the order things start in.
#![forbid(unsafe_code)]

use std::{
    cell::Cell,
    future::Future,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering::Relaxed},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::Context;
use tokio::{
    net::TcpStream,
    runtime::{Handle, Runtime},
    sync::watch,
};
use tracing::warn;

thread_local! {
    static INDEX: Cell<usize> = const { Cell::new(0) };
}

/// The index of the worker running on this thread (0 outside of any worker).
pub fn current() -> usize {
    INDEX.with(Cell::get)
}

/// The number of workers for `requested` (0: one per CPU this process may use, which counts
/// a container's CPU quota).
pub fn resolve(requested: usize) -> usize {
    if requested > 0 {
        requested
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}

/// The data plane's workers.
#[derive(Debug)]
pub struct Workers {
    handles: Vec<Handle>,
    /// Client connections each worker serves, for the choice of a new connection's worker.
    load: Vec<AtomicUsize>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    stop: watch::Sender<bool>,
}

impl Workers {
    /// Starts `n` workers (at least one). Returns worker 0's runtime, which the caller drives
    /// (`block_on`) on this thread, and the set of workers.
    pub fn start(n: usize) -> anyhow::Result<(Runtime, Arc<Self>)> {
        let n = n.max(1);
        INDEX.with(|i| i.set(0));
        let main = runtime().context("starting data-plane worker 0")?;
        let (stop, _) = watch::channel(false);
        let mut handles = vec![main.handle().clone()];
        let mut threads = Vec::new();
        for index in 1..n {
            let rt = runtime().with_context(|| format!("starting data-plane worker {index}"))?;
            handles.push(rt.handle().clone());
            let mut stopped = stop.subscribe();
            let thread = std::thread::Builder::new()
                .name(format!("balancer-worker-{index}"))
                .spawn(move || {
                    INDEX.with(|i| i.set(index));
                    rt.block_on(async move {
                        let _ = stopped.wait_for(|s| *s).await;
                    });
                    rt.shutdown_timeout(Duration::from_secs(1));
                })
                .with_context(|| format!("starting the thread of data-plane worker {index}"))?;
            threads.push(thread);
        }
        let load = handles.iter().map(|_| AtomicUsize::new(0)).collect();
        Ok((
            main,
            Arc::new(Self {
                handles,
                load,
                threads: Mutex::new(threads),
                stop,
            }),
        ))
    }

    /// How many workers there are: the number of shards a per-worker structure needs.
    pub fn count(&self) -> usize {
        self.handles.len()
    }

    /// Client connections each worker serves, by worker index.
    pub fn loads(&self) -> Vec<usize> {
        self.load.iter().map(|l| l.load(Relaxed)).collect()
    }

    /// Runs `serve` for an accepted connection on the worker serving the fewest connections.
    /// Called on worker 0 (the listeners' worker). The connection moves to the chosen worker's
    /// reactor; if that fails (out of file descriptors for the worker's registration, say) the
    /// connection is dropped with a log line and nothing else is affected.
    pub fn dispatch<F, Fut>(self: &Arc<Self>, stream: TcpStream, serve: F)
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let index = self
            .load
            .iter()
            .enumerate()
            .min_by_key(|(_, l)| l.load(Relaxed))
            .map_or(0, |(i, _)| i);
        self.load[index].fetch_add(1, Relaxed);
        let done = Done {
            workers: self.clone(),
            index,
        };
        if index == current() {
            tokio::spawn(async move {
                serve(stream).await;
                drop(done);
            });
            return;
        }
        let std = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "cannot hand a connection to worker {index}; dropped");
                return;
            }
        };
        self.handles[index].spawn(async move {
            match TcpStream::from_std(std) {
                Ok(stream) => serve(stream).await,
                Err(e) => warn!(error = %e, "worker {index} cannot take a connection; dropped"),
            }
            drop(done);
        });
    }

    /// Stops workers 1..n (their remaining tasks are dropped) and waits for their threads.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        for t in threads {
            let _ = t.join();
        }
    }
}

/// Counts a connection off its worker's load when it ends.
struct Done {
    workers: Arc<Workers>,
    index: usize,
}

impl Drop for Done {
    fn drop(&mut self) {
        self.workers.load[self.index].fetch_sub(1, Relaxed);
    }
}

fn runtime() -> std::io::Result<Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_go_to_the_least_loaded_worker_and_run_there() {
        let (rt, workers) = Workers::start(3).expect("workers");
        assert_eq!(workers.count(), 3);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let mut clients = Vec::new();
            for _ in 0..6 {
                clients.push(std::net::TcpStream::connect(addr).unwrap());
                let (s, _) = listener.accept().await.unwrap();
                let tx = tx.clone();
                workers.dispatch(s, move |_s| async move {
                    tx.send(current()).unwrap();
                    // Held open until the test ends: the load stays counted.
                    std::future::pending::<()>().await;
                });
            }
            let mut seen = Vec::new();
            for _ in 0..6 {
                let w = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                    .await
                    .expect("every connection is served")
                    .unwrap();
                seen.push(w);
            }
            seen.sort_unstable();
            assert_eq!(seen, [0, 0, 1, 1, 2, 2]);
        });
        workers.stop();
    }
}
