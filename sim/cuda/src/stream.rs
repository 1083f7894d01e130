//! Streams and events. Every stream has a worker thread that runs its work in order, so a copy, a
//! memset or a launch returns before it has happened, as on a GPU: a host read of device results
//! without the synchronisation a real GPU needs sees stale data (or the poison a pinned destination
//! gets when the copy is queued). Events are markers in a stream's order; recording one queues a
//! time stamp, waiting for one waits for that point of its stream.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use cudarc::driver::sys::CUresult;

/// One unit of a stream's work. An `Err` is a fault of the device (it makes the context's error
/// sticky); the message says what happened.
pub type Job = Box<dyn FnOnce() -> Result<(), (CUresult, String)> + Send>;

/// Called with a job's fault.
pub type OnFault = Arc<dyn Fn(CUresult, String) + Send + Sync>;
/// True once the context is unusable (its work is skipped).
pub type IsDead = Arc<dyn Fn() -> bool + Send + Sync>;

struct Queue {
    jobs: VecDeque<(u64, Job)>,
    submitted: u64,
    completed: u64,
    stop: bool,
}

pub struct Stream {
    pub id: u64,
    queue: Mutex<Queue>,
    work: Condvar,
    done: Condvar,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Stream {
    /// A stream whose worker reports faults to `on_fault` (which makes them sticky) and skips its
    /// work while `dead()` is true (a context after a fault runs nothing more).
    pub fn new(id: u64, on_fault: OnFault, dead: IsDead) -> Arc<Stream> {
        let s = Arc::new(Stream {
            id,
            queue: Mutex::new(Queue {
                jobs: VecDeque::new(),
                submitted: 0,
                completed: 0,
                stop: false,
            }),
            work: Condvar::new(),
            done: Condvar::new(),
            thread: Mutex::new(None),
        });
        let worker = Arc::clone(&s);
        let handle = std::thread::Builder::new()
            .name(format!("ptsim-stream-{id}"))
            .spawn(move || worker.run(on_fault, dead))
            .expect("starting a stream worker thread");
        *s.thread.lock().unwrap() = Some(handle);
        s
    }

    fn run(&self, on_fault: OnFault, dead: IsDead) {
        // The jobs' own accesses (copies, memsets, cuBLAS) are the driver's, not a kernel's.
        let _ignore = crate::driver::TsanIgnore::begin();
        loop {
            let (seq, job) = {
                let mut q = self.queue.lock().unwrap();
                loop {
                    if let Some(j) = q.jobs.pop_front() {
                        break j;
                    }
                    if q.stop {
                        return;
                    }
                    q = self.work.wait(q).unwrap();
                }
            };
            if !dead() {
                if let Err((code, msg)) = job() {
                    on_fault(code, msg);
                }
            }
            let mut q = self.queue.lock().unwrap();
            q.completed = seq;
            self.done.notify_all();
        }
    }

    /// Queues `job`; returns its sequence number.
    pub fn submit(&self, job: Job) -> u64 {
        let mut q = self.queue.lock().unwrap();
        q.submitted += 1;
        let seq = q.submitted;
        q.jobs.push_back((seq, job));
        self.work.notify_one();
        seq
    }

    /// The sequence number of the last queued job.
    pub fn submitted(&self) -> u64 {
        self.queue.lock().unwrap().submitted
    }

    pub fn is_done(&self, seq: u64) -> bool {
        self.queue.lock().unwrap().completed >= seq
    }

    /// Waits until job `seq` (and everything before it) has run.
    pub fn wait(&self, seq: u64) {
        let mut q = self.queue.lock().unwrap();
        while q.completed < seq {
            q = self.done.wait(q).unwrap();
        }
    }

    /// Waits until everything queued so far has run.
    pub fn wait_all(&self) {
        let seq = self.submitted();
        self.wait(seq);
    }

    /// Stops the worker after the queued work (stream destroyed).
    pub fn shutdown(&self) {
        {
            let mut q = self.queue.lock().unwrap();
            q.stop = true;
            self.work.notify_one();
        }
        if let Some(h) = self.thread.lock().unwrap().take() {
            if h.thread().id() != std::thread::current().id() {
                let _ = h.join();
            }
        }
    }
}

/// Where an event was last recorded, and when that point of its stream was reached.
#[derive(Default)]
pub struct EventState {
    pub stream: Option<Arc<Stream>>,
    pub seq: u64,
    pub time: Option<Instant>,
}

pub struct Event {
    pub id: u64,
    /// Created with `CU_EVENT_DISABLE_TIMING`.
    pub no_timing: bool,
    pub state: Mutex<EventState>,
}

impl Event {
    /// Complete: never recorded, or its stream passed the recorded point.
    pub fn is_complete(&self) -> bool {
        let st = self.state.lock().unwrap();
        match &st.stream {
            None => true,
            Some(s) => s.is_done(st.seq),
        }
    }

    /// Waits for the recorded point (returns at once if never recorded).
    pub fn wait(&self) {
        let (stream, seq) = {
            let st = self.state.lock().unwrap();
            (st.stream.clone(), st.seq)
        };
        if let Some(s) = stream {
            s.wait(seq);
        }
    }
}
