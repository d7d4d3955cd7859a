//! Waiting for a condition with a deadline, written once: the tests poll (never a fixed sleep)
//! and fail with what they waited for and what they saw.

use std::time::{Duration, Instant};

/// Polls `ok` every 200 ms for up to `secs`; fails with `what` and `context()` on timeout.
pub fn wait_for(secs: u64, what: &str, mut ok: impl FnMut() -> bool, context: impl Fn() -> String) {
    poll(secs, Duration::from_millis(200), what, || Ok(ok()), context);
}

/// Polls `check` every `every` for up to `secs`: `Ok(true)` is done, `Ok(false)` polls again,
/// `Err(why)` fails at once (a process died). Fails with `what` and `context()` on timeout.
pub fn poll(
    secs: u64,
    every: Duration,
    what: &str,
    mut check: impl FnMut() -> Result<bool, String>,
    context: impl Fn() -> String,
) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        match check() {
            Ok(true) => return,
            Ok(false) => {}
            Err(why) => panic!("{what}: {why}"),
        }
        assert!(Instant::now() < deadline, "{what}: not after {secs} s\n{}", context());
        std::thread::sleep(every);
    }
}

/// Awaits `f` every 100 ms for up to `secs` until it yields a value, and returns it; fails
/// with `what` on timeout. For tests that run the server or the agent in process.
pub async fn eventually<T>(secs: u64, what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not after {secs} s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn eventually_returns_the_first_value_and_polls_until_then() {
        let mut n = 0;
        let got = eventually(5, "third call", async || {
            n += 1;
            (n == 3).then_some(n)
        })
        .await;
        assert_eq!(got, 3);
    }

    #[test]
    #[should_panic(expected = "never: not after 0 s")]
    fn a_condition_that_never_holds_fails_with_its_name() {
        wait_for(0, "never", || false, String::new);
    }

    #[test]
    #[should_panic(expected = "dead: exited")]
    fn an_error_fails_at_once() {
        poll(60, Duration::from_millis(1), "dead", || Err("exited".into()), String::new);
    }
}
