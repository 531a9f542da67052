// A request body kept whole until it is sent on: in memory up to a size, then
// in a private temporary file, so that large chunked bodies do not leave
// vmcgi holding (and its allocator keeping) megabytes per request.

import { mkdtempSync, rmSync } from 'node:fs'
import { open, rm, type FileHandle } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Readable } from 'node:stream'

/** The folder for the files of one vmcgi process: made on first use (mode 0700), removed by removeAll(). */
export class SpoolFolder {
  #parent: string
  #path: string | undefined
  #count = 0

  constructor(parent = tmpdir()) {
    this.#parent = parent
  }

  next(): string {
    this.#path ??= mkdtempSync(join(this.#parent, 'vmcgi-bodies-'))
    return join(this.#path, `body-${++this.#count}`)
  }

  removeAll(): void {
    if (this.#path) rmSync(this.#path, { recursive: true, force: true })
    this.#path = undefined
  }
}

export class SpooledBody {
  #memoryBytes: number
  #folder: SpoolFolder
  #chunks: Buffer[] = []
  #length = 0
  #file: { path: string; handle: FileHandle } | undefined
  #disposed = false

  constructor(memoryBytes: number, folder: SpoolFolder) {
    this.#memoryBytes = memoryBytes
    this.#folder = folder
  }

  get length(): number {
    return this.#length
  }

  /** Whether the body went to a file. */
  get spooled(): boolean {
    return this.#file !== undefined
  }

  async append(chunk: Buffer): Promise<void> {
    this.#length += chunk.length
    if (!this.#file && this.#length <= this.#memoryBytes) return void this.#chunks.push(chunk)
    if (!this.#file) {
      const path = this.#folder.next()
      this.#file = { path, handle: await open(path, 'wx', 0o600) }
      for (const held of this.#chunks.splice(0)) await this.#file.handle.write(held)
    }
    await this.#file.handle.write(chunk)
  }

  /** The whole body, to read once. */
  async open(): Promise<Readable> {
    if (!this.#file) return Readable.from(this.#chunks)
    await this.#file.handle.close()
    const reopened = await open(this.#file.path, 'r')
    return reopened.createReadStream()
  }

  /** Drops what is held: the memory, and the file (an open reader keeps it until it is done). */
  dispose(): void {
    if (this.#disposed) return
    this.#disposed = true
    this.#chunks = []
    if (this.#file) {
      const { path, handle } = this.#file
      void handle.close().catch(() => {}).then(() => rm(path, { force: true }))
    }
  }
}
