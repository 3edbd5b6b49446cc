//! [`Space`]: the free-space check behind `min_free_bytes`, cached for 200 ms and
//! rechecked at once after a write fails.

use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::lock;

/// Free-space check, cached for 200 ms.
#[derive(Debug)]
pub(super) struct Space {
    min_free: u64,
    cache: Mutex<Option<(Instant, bool)>>,
}

impl Space {
    pub(super) fn new(min_free: u64) -> Self {
        Self {
            min_free,
            cache: Mutex::new(None),
        }
    }

    pub(super) fn check(&self, dir: &Path) -> bool {
        let mut c = lock(&self.cache);
        if let Some((at, ok)) = *c
            && at.elapsed() < Duration::from_millis(200)
        {
            return ok;
        }
        let ok = match rustix::fs::statvfs(dir) {
            Ok(s) => s.f_bavail.saturating_mul(s.f_frsize) >= self.min_free,
            Err(_) => true,
        };
        *c = Some((Instant::now(), ok));
        ok
    }

    pub(super) fn force_recheck(&self) {
        *lock(&self.cache) = None;
    }
}
