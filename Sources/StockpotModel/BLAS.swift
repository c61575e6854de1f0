#if canImport(Accelerate)
import Accelerate
#elseif canImport(CBLAS)
import CBLAS
#endif

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
