pub mod guest;
pub mod libkvm;
pub mod libluo;
pub mod selftests;
