//! Scenarios that share one expensive fixture (a control plane, a
//! cluster), each a test of its own under `libtest-mimic`: the first to
//! run starts the fixture, they run one at a time in order, and the
//! fixture stops once all have run.

use std::sync::{Arc, Mutex, PoisonError};

/// One scenario over the shared fixture `F`.
pub type Scenario<F> = fn(&mut F);

/// The shared fixture: started by the first scenario that runs.
enum Shared<F> {
    NotStarted,
    Running(Box<F>),
    /// Starting it panicked (the first scenario to run says why).
    Failed,
}

/// Runs `scenarios` (name, body) over one fixture made by `start`, with
/// the command line's filters; returns the exit code.
pub fn run<F: Send + 'static>(
    scenarios: &[(&'static str, Scenario<F>)],
    start: fn() -> F,
) -> std::process::ExitCode {
    let mut args = libtest_mimic::Arguments::from_args();
    // One fixture: one scenario at a time.
    args.test_threads = Some(1);
    let shared = Arc::new(Mutex::new(Shared::<F>::NotStarted));
    let trials = scenarios
        .iter()
        .map(|&(name, scenario)| {
            let shared = Arc::clone(&shared);
            libtest_mimic::Trial::test(name, move || {
                let mut shared = shared.lock().unwrap_or_else(PoisonError::into_inner);
                if matches!(*shared, Shared::NotStarted) {
                    *shared = Shared::Failed;
                    *shared = Shared::Running(Box::new(start()));
                }
                let Shared::Running(fixture) = &mut *shared else {
                    return Err("the shared fixture did not start; see the first scenario".into());
                };
                scenario(fixture);
                Ok(())
            })
        })
        .collect();
    let conclusion = libtest_mimic::run(&args, trials);
    // The fixture stops here.
    *shared.lock().unwrap_or_else(PoisonError::into_inner) = Shared::NotStarted;
    conclusion.exit_code()
}
