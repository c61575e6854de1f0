import Foundation

/// The CPU priority of a whole process, for services that share a host with the request path but are not on it
/// (the registry): under contention the serving processes keep the CPU.
public enum ProcessPriority {
    /// Sets the calling thread to nice `value` (Linux: the nice value is per thread, `who` = 0 is the caller).
    /// Elsewhere it does nothing: on Darwin the same call would lower the whole process.
    public static func lowerCurrentThread(to value: Int32) {
        #if os(Linux)
        _ = setpriority(__priority_which_t(PRIO_PROCESS.rawValue), 0, value)
        #endif
    }

    /// Sets every thread of this process to nice `value` (0 normal … 19 lowest). On Linux the nice value is per
    /// thread and a new thread inherits its creator's, so every current thread is set (from `/proc/self/task`);
    /// calling it again later catches a thread created meanwhile by one that was not yet lowered.
    public static func lower(to value: Int32) {
        #if os(Linux)
        for task in (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/task")) ?? [] {
            if let tid = id_t(task) { _ = setpriority(__priority_which_t(PRIO_PROCESS.rawValue), tid, value) }
        }
        #else
        _ = setpriority(PRIO_PROCESS, 0, value)
        #endif
    }
}
