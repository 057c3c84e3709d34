//! redis_streams source. (Work in progress: issue 6.)
