//! Helpers shared by the store tests.

/// Opens the store's sled database directly, waiting for the background threads of a store
/// that was just dropped to release sled's lock.
pub(crate) fn open_sled(dir: &std::path::Path) -> sled::Db {
    for _ in 0..100 {
        match sled::open(dir) {
            Ok(db) => return db,
            Err(e) if e.to_string().contains("could not acquire lock") => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => panic!("opening sled: {e}"),
        }
    }
    panic!("sled's lock was never released");
}
