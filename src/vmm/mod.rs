pub mod fleet;
pub mod guest;
pub mod libkvm;
pub mod libluo;
pub mod rfc;
pub mod selftests;
pub mod slots;
