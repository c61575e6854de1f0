#if canImport(Accelerate)
import Accelerate
#elseif canImport(CBLAS)
import CBLAS
#endif
#if canImport(Glibc)
import Glibc
#endif
import Foundation

/// Thin wrapper over single-precision cblas GEMM, row-major only.
///
/// Stockpot runs BLAS single-threaded per call: parallelism comes from serving many requests (or training one
/// model per core), not from splitting one small GEMM over threads.
public enum BLAS {
    /// Pins the BLAS library to one thread. Idempotent; call once at start-up.
    public static func useSingleThread() {
        #if canImport(CBLAS) && !canImport(Accelerate)
        openblas_set_num_threads(1)
        #endif
    }

    /// The kernel family the BLAS library chose (OpenBLAS core name, e.g. `Haswell`), or `Accelerate`.
    public static var kernelName: String {
        #if canImport(CBLAS) && !canImport(Accelerate)
        return String(cString: openblas_get_corename())
        #else
        return "Accelerate"
        #endif
    }

    /// OpenBLAS's generic fallbacks: what a DYNAMIC_ARCH build picks on a CPU it does not recognise.
    static let genericKernels: Set<String> = ["Prescott", "Core2", "Penryn", "Dunnington", "Nehalem", "Atom", "Katmai"]

    /// The best OpenBLAS core type this CPU supports, from `/proc/cpuinfo` flags (Linux x86-64 only).
    public static func preferredCoreType() -> String? {
        guard let text = try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8),
              let line = text.split(separator: "\n").first(where: { $0.hasPrefix("flags") })
        else { return nil }
        let flags = Set(line.split(separator: " ").map(String.init))
        if ["avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd"].allSatisfy(flags.contains) { return "SkylakeX" }
        if ["avx2", "fma"].allSatisfy(flags.contains) { return "Haswell" }
        return nil
    }

    /// OpenBLAS selects its kernels once, when the library loads. A build that does not know the CPU (as Debian's
    /// 0.3.21 on recent Xeons) falls back to SSE3 kernels about 3× slower than the AVX2/AVX-512 ones. When that
    /// happened and the user has not set `OPENBLAS_CORETYPE`, this sets it to the CPU's best supported type and
    /// re-executes the program (once) so the library loads again with the right kernels. Call it first in `main`.
    /// `STOCKPOT_BLAS_AUTOTUNE=0` turns it off.
    public static func reexecWithFasterKernelsIfNeeded() {
        #if os(Linux) && canImport(CBLAS)
        let env = ProcessInfo.processInfo.environment
        guard env["OPENBLAS_CORETYPE"] == nil, env["STOCKPOT_BLAS_AUTOTUNE"] != "0",
              genericKernels.contains(kernelName), let core = preferredCoreType()
        else { return }
        setenv("OPENBLAS_CORETYPE", core, 1)
        setenv("STOCKPOT_BLAS_AUTOTUNE", "0", 1) // never loop
        execv("/proc/self/exe", CommandLine.unsafeArgv)
        // execv returns only on failure: carry on with the generic kernels.
        #endif
    }

    /// C[m×n] = alpha · op(A) · op(B) + beta · C, all row-major.
    /// - Parameters:
    ///   - transA: use Aᵀ (A stored as k×m) instead of A (m×k).
    ///   - transB: use Bᵀ (B stored as n×k) instead of B (k×n).
    @inline(__always)
    public static func sgemm(
        transA: Bool, transB: Bool, m: Int, n: Int, k: Int,
        alpha: Float, a: UnsafePointer<Float>, lda: Int,
        b: UnsafePointer<Float>, ldb: Int,
        beta: Float, c: UnsafeMutablePointer<Float>, ldc: Int
    ) {
        #if canImport(Accelerate)
        cblas_sgemm(
            CblasRowMajor, transA ? CblasTrans : CblasNoTrans, transB ? CblasTrans : CblasNoTrans,
            Int32(m), Int32(n), Int32(k), alpha, a, Int32(lda), b, Int32(ldb), beta, c, Int32(ldc))
        #else
        cblas_sgemm(
            CblasRowMajor, transA ? CblasTrans : CblasNoTrans, transB ? CblasTrans : CblasNoTrans,
            blasint(m), blasint(n), blasint(k), alpha, a, blasint(lda), b, blasint(ldb), beta, c, blasint(ldc))
        #endif
    }
}

extension Duration {
    /// The duration in seconds as a Double.
    public var seconds: Double { Double(components.seconds) + Double(components.attoseconds) / 1e18 }
}
