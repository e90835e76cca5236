//! Scenarios side by side: lanes take scenarios in queue order; a scenario that starts from a
//! saved state waits until the scenario that saves it has ended; an exclusive one runs with every
//! other lane idle (and holds back the queue until it can). Results come back in queue order,
//! whatever order the scenarios ended in.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};

/// What the scheduler needs to know of a scenario.
#[derive(Debug, Clone, Default)]
pub struct Job {
    pub exclusive: bool,
    /// The saved state it starts from.
    pub needs: Option<String>,
    /// The state it saves.
    pub saves: Option<String>,
}

#[derive(Default)]
struct Board {
    pending: Vec<usize>,
    running: Vec<usize>,
    /// States whose saving scenario has ended (saved or not).
    ended: BTreeSet<String>,
}

impl Board {
    /// The next job a free lane may start, if any.
    fn pick(&self, jobs: &[Job]) -> Option<usize> {
        let exclusive_running = self.running.iter().any(|&j| jobs[j].exclusive);
        if exclusive_running {
            return None;
        }
        let ready = |j: &usize| {
            jobs[*j]
                .needs
                .as_ref()
                .is_none_or(|s| self.ended.contains(s))
        };
        match self.pending.iter().find(|j| ready(j)) {
            // An exclusive job holds the queue until the lanes are empty.
            Some(&j) if jobs[j].exclusive => self.running.is_empty().then_some(j),
            Some(&j) => Some(j),
            // Nothing is ready and nothing runs that could make it so (a state nobody will
            // save): run the next anyway; it reports why it cannot start.
            None if self.running.is_empty() => self.pending.first().copied(),
            None => None,
        }
    }
}

/// Runs `jobs` on `lanes` lanes: `work(job, lane)` for each, `done(job, lane, &result)` as each
/// ends (one at a time). Stops taking new jobs once `interrupted` is set. Returns the results
/// in job order (`None` for jobs never started).
pub fn run<R: Send>(
    jobs: &[Job],
    lanes: usize,
    interrupted: &AtomicBool,
    work: impl Fn(usize, usize) -> R + Sync,
    done: impl FnMut(usize, usize, &R) + Send,
) -> Vec<Option<R>> {
    let board = Mutex::new(Board {
        pending: (0..jobs.len()).collect(),
        ..Default::default()
    });
    let changed = Condvar::new();
    let results: Mutex<Vec<Option<R>>> = Mutex::new((0..jobs.len()).map(|_| None).collect());
    let done = Mutex::new(done);
    std::thread::scope(|scope| {
        for lane in 0..lanes.max(1) {
            let (board, changed, results, done, work) = (&board, &changed, &results, &done, &work);
            scope.spawn(move || loop {
                let job = {
                    let Ok(mut b) = board.lock() else { return };
                    loop {
                        if b.pending.is_empty() || interrupted.load(Ordering::SeqCst) {
                            return;
                        }
                        if let Some(j) = b.pick(jobs) {
                            b.pending.retain(|&p| p != j);
                            b.running.push(j);
                            break j;
                        }
                        b = match changed.wait(b) {
                            Ok(b) => b,
                            Err(_) => return,
                        };
                    }
                };
                let r = work(job, lane);
                if let Ok(mut d) = done.lock() {
                    (*d)(job, lane, &r);
                }
                if let Ok(mut rs) = results.lock() {
                    rs[job] = Some(r);
                }
                if let Ok(mut b) = board.lock() {
                    b.running.retain(|&p| p != job);
                    if let Some(s) = &jobs[job].saves {
                        b.ended.insert(s.clone());
                    }
                }
                changed.notify_all();
            });
        }
    });
    results.into_inner().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn job(exclusive: bool, needs: Option<&str>, saves: Option<&str>) -> Job {
        Job {
            exclusive,
            needs: needs.map(str::to_string),
            saves: saves.map(str::to_string),
        }
    }

    /// Each job notes when it ran and in which lane; the rules hold on the record.
    #[test]
    fn lanes_keep_states_and_exclusive_jobs_in_order() {
        let jobs = vec![
            job(true, None, None),            // 0: alone
            job(false, None, Some("booted")), // 1: saves
            job(false, Some("booted"), None), // 2: waits for 1
            job(false, None, None),           // 3
            job(false, Some("booted"), None), // 4: waits for 1
        ];
        let t0 = Instant::now();
        let spans: Mutex<Vec<(usize, usize, Duration, Duration)>> = Mutex::new(Vec::new());
        let order = Mutex::new(Vec::new());
        let out = run(
            &jobs,
            2,
            &AtomicBool::new(false),
            |j, lane| {
                let start = t0.elapsed();
                std::thread::sleep(Duration::from_millis(if j == 1 { 120 } else { 40 }));
                spans
                    .lock()
                    .expect("spans")
                    .push((j, lane, start, t0.elapsed()));
                format!("result {j}")
            },
            |j, _, _| order.lock().expect("order").push(j),
        );
        // Results in job order, each one's own.
        let got: Vec<String> = out.into_iter().map(|r| r.expect("ran")).collect();
        assert_eq!(
            got,
            (0..5).map(|j| format!("result {j}")).collect::<Vec<_>>()
        );
        let spans = spans.into_inner().expect("spans");
        let span = |j: usize| spans.iter().find(|s| s.0 == j).copied().expect("span");
        let overlaps = |a: usize, b: usize| {
            let (a, b) = (span(a), span(b));
            a.2 < b.3 && b.2 < a.3
        };
        for other in 1..5 {
            assert!(
                !overlaps(0, other),
                "the exclusive job ran alone: {spans:?}"
            );
        }
        assert!(
            span(2).2 >= span(1).3,
            "2 started after its state was saved"
        );
        assert!(
            span(4).2 >= span(1).3,
            "4 started after its state was saved"
        );
        // Two lanes were used side by side: 3 ran while 1 (the slow saver) did.
        assert!(overlaps(1, 3), "{spans:?}");
        assert_eq!(order.into_inner().expect("order").len(), 5);
    }

    #[test]
    fn a_state_nobody_saves_does_not_hang_the_run() {
        let jobs = vec![job(false, Some("missing"), None), job(false, None, None)];
        let out = run(&jobs, 2, &AtomicBool::new(false), |j, _| j, |_, _, _| {});
        assert_eq!(out, vec![Some(0), Some(1)]);
    }

    #[test]
    fn an_interrupted_run_starts_nothing_more() {
        let stop = AtomicBool::new(false);
        let jobs = vec![Job::default(); 4];
        let out = run(
            &jobs,
            1,
            &stop,
            |j, _| {
                stop.store(true, Ordering::SeqCst);
                j
            },
            |_, _, _| {},
        );
        assert_eq!(out, vec![Some(0), None, None, None]);
    }
}
