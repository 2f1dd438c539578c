//! The differ client adapter lives in proxy-sdk with the other adapters (a vendor's proxy
//! needs it without berthd's services); this path stays for code that imports it from here.

pub use berth_proxy_sdk::diff::DiffClient;
