//! rabbitmq source. (Work in progress: issue 6.)
