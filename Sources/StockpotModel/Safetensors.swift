import Foundation

/// A named n-dimensional array as stored in a safetensors file (row-major, little-endian).
public struct Tensor: Sendable, Equatable {
    /// Element storage; the dtypes Stockpot writes.
    public enum Storage: Sendable, Equatable {
        case f32([Float])
        case i8([Int8])
    }

    public var shape: [Int]
    public var storage: Storage

    public init(shape: [Int], f32 values: [Float]) {
        self.shape = shape
        self.storage = .f32(values)
    }

    public init(shape: [Int], i8 values: [Int8]) {
        self.shape = shape
        self.storage = .i8(values)
    }

    public var elementCount: Int { shape.reduce(1, *) }

    /// The safetensors dtype tag (`F32`, `I8`).
    public var dtype: String {
        switch storage {
        case .f32: return "F32"
        case .i8: return "I8"
        }
    }

    public var byteCount: Int {
        switch storage {
        case .f32(let v): return v.count * 4
        case .i8(let v): return v.count
        }
    }

    /// The F32 values, or an error naming the tensor if it holds another dtype.
    public func floats(_ name: String) throws -> [Float] {
        guard case .f32(let v) = storage else { throw ModelError.invalidWeights("tensor '\(name)' is \(dtype), expected F32") }
        return v
    }

    public func int8s(_ name: String) throws -> [Int8] {
        guard case .i8(let v) = storage else { throw ModelError.invalidWeights("tensor '\(name)' is \(dtype), expected I8") }
        return v
    }
}

/// Reader and writer for the safetensors format: an 8-byte little-endian header length, a JSON header mapping
/// tensor names to `{dtype, shape, data_offsets}` (plus an optional `__metadata__` string map), then the raw bytes.
public enum Safetensors {
    public static func encode(_ tensors: [String: Tensor], metadata: [String: String] = [:]) throws -> Data {
        var header: [String: Any] = [:]
        if !metadata.isEmpty { header["__metadata__"] = metadata }
        var offset = 0
        let names = tensors.keys.sorted()
        for name in names {
            let t = tensors[name]!
            guard t.elementCount == (t.byteCount / (t.dtype == "F32" ? 4 : 1)) else {
                throw ModelError.invalidWeights("tensor '\(name)': shape \(t.shape) does not match its element count")
            }
            header[name] = ["dtype": t.dtype, "shape": t.shape, "data_offsets": [offset, offset + t.byteCount]]
            offset += t.byteCount
        }
        var json = try JSONSerialization.data(withJSONObject: header, options: [.sortedKeys])
        // Pad the header with spaces so the data buffer starts 8-byte aligned.
        while (json.count % 8) != 0 { json.append(0x20) }
        var out = Data(capacity: 8 + json.count + offset)
        var len = UInt64(json.count).littleEndian
        withUnsafeBytes(of: &len) { out.append(contentsOf: $0) }
        out.append(json)
        for name in names {
            switch tensors[name]!.storage {
            case .f32(let v):
                v.withUnsafeBufferPointer { buf in
                    #if _endian(big)
                    for x in buf { var le = x.bitPattern.littleEndian; withUnsafeBytes(of: &le) { out.append(contentsOf: $0) } }
                    #else
                    out.append(UnsafeBufferPointer(start: UnsafeRawPointer(buf.baseAddress!).assumingMemoryBound(to: UInt8.self), count: buf.count * 4))
                    #endif
                }
            case .i8(let v):
                v.withUnsafeBytes { out.append(contentsOf: $0) }
            }
        }
        return out
    }

    public static func decode(_ data: Data) throws -> (tensors: [String: Tensor], metadata: [String: String]) {
        guard data.count >= 8 else { throw ModelError.invalidWeights("file shorter than the 8-byte header length") }
        let headerLen = data.withUnsafeBytes { raw -> UInt64 in
            UInt64(littleEndian: raw.loadUnaligned(fromByteOffset: 0, as: UInt64.self))
        }
        guard headerLen <= UInt64(data.count - 8) else {
            throw ModelError.invalidWeights("header length \(headerLen) exceeds file size \(data.count)")
        }
        let headerEnd = 8 + Int(headerLen)
        let headerData = data.subdata(in: data.startIndex + 8..<data.startIndex + headerEnd)
        guard let header = try JSONSerialization.jsonObject(with: headerData) as? [String: Any] else {
            throw ModelError.invalidWeights("header is not a JSON object")
        }
        let bufferSize = data.count - headerEnd
        var tensors: [String: Tensor] = [:]
        var metadata: [String: String] = [:]
        for (name, value) in header {
            if name == "__metadata__" {
                metadata = (value as? [String: String]) ?? [:]
                continue
            }
            guard let entry = value as? [String: Any],
                  let dtype = entry["dtype"] as? String,
                  let shape = (entry["shape"] as? [NSNumber])?.map({ $0.intValue }) ?? (entry["shape"] as? [Int]),
                  let offsets = (entry["data_offsets"] as? [NSNumber])?.map({ $0.intValue }) ?? (entry["data_offsets"] as? [Int]),
                  offsets.count == 2
            else { throw ModelError.invalidWeights("malformed header entry for '\(name)'") }
            let (begin, end) = (offsets[0], offsets[1])
            guard begin >= 0, begin <= end, end <= bufferSize else {
                throw ModelError.invalidWeights("tensor '\(name)' offsets [\(begin), \(end)] outside data (\(bufferSize) bytes)")
            }
            guard shape.allSatisfy({ $0 >= 0 }) else { throw ModelError.invalidWeights("tensor '\(name)' has a negative dimension") }
            let count = shape.reduce(1, *)
            let start = data.startIndex + headerEnd + begin
            switch dtype {
            case "F32":
                guard end - begin == count * 4 else {
                    throw ModelError.invalidWeights("tensor '\(name)': \(end - begin) bytes for \(count) F32 values")
                }
                var values = [Float](repeating: 0, count: count)
                values.withUnsafeMutableBytes { dst in
                    _ = data.copyBytes(to: dst, from: start..<start + count * 4)
                }
                #if _endian(big)
                values = values.map { Float(bitPattern: UInt32(littleEndian: $0.bitPattern)) }
                #endif
                tensors[name] = Tensor(shape: shape, f32: values)
            case "I8":
                guard end - begin == count else {
                    throw ModelError.invalidWeights("tensor '\(name)': \(end - begin) bytes for \(count) I8 values")
                }
                var values = [Int8](repeating: 0, count: count)
                values.withUnsafeMutableBytes { dst in _ = data.copyBytes(to: dst, from: start..<start + count) }
                tensors[name] = Tensor(shape: shape, i8: values)
            default:
                throw ModelError.invalidWeights("tensor '\(name)' has unsupported dtype \(dtype)")
            }
        }
        return (tensors, metadata)
    }

    public static func read(_ url: URL) throws -> (tensors: [String: Tensor], metadata: [String: String]) {
        let data: Data
        do { data = try Data(contentsOf: url, options: .mappedIfSafe) } catch {
            throw ModelError.io("cannot read \(url.path): \(error.localizedDescription)")
        }
        return try decode(data)
    }

    public static func write(_ tensors: [String: Tensor], metadata: [String: String] = [:], to url: URL) throws {
        try AtomicFile.write(try encode(tensors, metadata: metadata), to: url)
    }
}

/// Writes files and folders so that a reader sees either the old content or the complete new one, never a half.
public enum AtomicFile {
    /// Writes to a temporary file in the same folder, then renames it over `url`.
    public static func write(_ data: Data, to url: URL) throws {
        do { try data.write(to: url, options: .atomic) } catch {
            throw ModelError.io("cannot write \(url.path): \(error.localizedDescription)")
        }
    }

    /// Publishes the complete folder `staged` at `url` in one atomic step, for folders that readers in other
    /// tasks or processes may open at any moment (a serving cache): the content moves to a hidden sibling and
    /// `url` becomes a symbolic link to it, swapped with rename(2), so a reader of `url` sees the old folder or
    /// the new one, never neither. Publishers of the same `url` take turns (an exclusive lock on a sibling
    /// lock file); afterwards the hidden siblings of older publications and leftovers of a crash are removed,
    /// keeping the content just replaced until the next publication. `staged` must be on the same file system
    /// as `url`.
    public static func publishDirectory(_ staged: URL, at url: URL) throws {
        let fm = FileManager.default
        let parent = url.deletingLastPathComponent()
        let name = url.lastPathComponent
        do { try fm.createDirectory(at: parent, withIntermediateDirectories: true) } catch {
            throw ModelError.io("cannot create \(parent.path): \(error.localizedDescription)")
        }
        let lockFD = open(parent.appendingPathComponent(".\(name).lock").path, O_RDWR | O_CREAT | O_CLOEXEC, 0o644)
        guard lockFD >= 0 else { throw ModelError.io("cannot lock \(url.path) (errno \(errno))") }
        defer { close(lockFD) } // releases the lock
        while flock(lockFD, LOCK_EX) != 0 {
            guard errno == EINTR else { throw ModelError.io("cannot lock \(url.path) (errno \(errno))") }
        }
        let tag = String(UInt64.random(in: 0...UInt64.max), radix: 36)
        let contentName = ".\(name).\(tag)"
        let content = parent.appendingPathComponent(contentName)
        let link = parent.appendingPathComponent(".\(name).link-\(tag)")
        var previous = fm.destinationOfSymbolicLinkIfAny(url)
        do {
            try fm.moveItem(at: staged, to: content)
            try fm.createSymbolicLink(atPath: link.path, withDestinationPath: contentName)
            if fm.destinationOfSymbolicLinkIfAny(url) == nil, fm.fileExists(atPath: url.path) {
                // A plain folder (written before folders were published as links): moved aside once, and kept
                // one generation like any replaced content.
                try fm.moveItem(at: url, to: parent.appendingPathComponent(".\(name).old-\(tag)"))
                previous = ".\(name).old-\(tag)"
            }
            guard rename(link.path, url.path) == 0 else { throw ModelError.io("cannot publish \(url.path) (errno \(errno))") }
        } catch {
            try? fm.removeItem(at: link)
            if fm.destinationOfSymbolicLinkIfAny(url) != contentName { try? fm.removeItem(at: content) }
            if let e = error as? ModelError { throw e }
            throw ModelError.io("cannot publish \(url.path): \(error.localizedDescription)")
        }
        // Everything hidden for this name but the live content, the one it replaced (a reader that resolved the
        // link just before the swap may still be opening its files: it goes at the next publication) and the
        // lock file.
        for sibling in (try? fm.contentsOfDirectory(atPath: parent.path)) ?? []
        where sibling.hasPrefix(".\(name).") && sibling != contentName && sibling != previous && sibling != ".\(name).lock" {
            try? fm.removeItem(at: parent.appendingPathComponent(sibling))
        }
    }

    /// Builds a folder through `fill` in a temporary sibling, then moves it into place (replacing an old one).
    public static func writeDirectory(_ url: URL, fill: (URL) throws -> Void) throws {
        let fm = FileManager.default
        let parent = url.deletingLastPathComponent()
        do { try fm.createDirectory(at: parent, withIntermediateDirectories: true) } catch {
            throw ModelError.io("cannot create \(parent.path): \(error.localizedDescription)")
        }
        let tmp = parent.appendingPathComponent(".\(url.lastPathComponent).tmp-\(UInt32.random(in: 0...UInt32.max))")
        try? fm.removeItem(at: tmp)
        do { try fm.createDirectory(at: tmp, withIntermediateDirectories: false) } catch {
            throw ModelError.io("cannot create \(tmp.path): \(error.localizedDescription)")
        }
        do {
            try fill(tmp)
            if fm.fileExists(atPath: url.path) {
                let old = parent.appendingPathComponent(".\(url.lastPathComponent).old-\(UInt32.random(in: 0...UInt32.max))")
                try fm.moveItem(at: url, to: old)
                try fm.moveItem(at: tmp, to: url)
                try? fm.removeItem(at: old)
            } else {
                try fm.moveItem(at: tmp, to: url)
            }
        } catch {
            try? fm.removeItem(at: tmp)
            if let e = error as? ModelError { throw e }
            throw ModelError.io("cannot write \(url.path): \(error.localizedDescription)")
        }
    }
}

extension FileManager {
    /// The target of a symbolic link, or nil when `url` is not one.
    func destinationOfSymbolicLinkIfAny(_ url: URL) -> String? {
        try? destinationOfSymbolicLink(atPath: url.path)
    }
}
