//! `store = "redis"`: leases with expiry and cached results in Redis.
//! (Work in progress: issue 5.)
