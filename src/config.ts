// Configuration: one JSON file, validated against a schema, defaults applied,
// paths resolved relative to the file, then frozen. Nothing downstream checks
// for undefined.

import { accessSync, closeSync, constants, openSync, readFileSync, readSync, statSync } from 'node:fs'
import { availableParallelism, tmpdir, totalmem } from 'node:os'
import { delimiter, dirname, isAbsolute, join, resolve } from 'node:path'
import { Ajv, type ErrorObject } from 'ajv'
import { ConfigError } from './errors.js'

export type AccelChoice = 'auto' | 'kvm' | 'hvf' | 'tcg'

export interface Config {
  readonly listen: { readonly host: string; readonly port: number }
  readonly health: { readonly path: string }
  readonly log: { readonly level: 'fatal' | 'error' | 'warn' | 'info' | 'debug' | 'trace' | 'silent' }
  readonly vm: {
    /** Absolute path of the QEMU system emulator. */
    readonly qemu: string
    readonly accel: AccelChoice
    /** The -machine value, properties included (`virt,gic-version=2`). */
    readonly machine: string
    /** The -cpu model; empty for vmcgi's choice (`max` under TCG, `host` under KVM and HVF). */
    readonly cpu: string
    readonly kernel: string
    /** Empty for a kernel that boots without one. */
    readonly initrd: string
    /** The kernel's command line; empty for none. */
    readonly append: string
    /**
     * A read-only disk image the guest sees as its only virtio-blk device
     * (a container image's root, see src/image/); empty for none.
     */
    readonly disk: string
    /** Appended to QEMU's arguments as they are, for what vmcgi has no field for. */
    readonly extraArgs: readonly string[]
    readonly memoryMiB: number
    readonly cpus: number
    readonly guestPort: number
    /** How much of the guest's serial console is kept for logs. */
    readonly consoleTailBytes: number
    /** Time between SIGTERM and SIGKILL when a VM is stopped. */
    readonly killGraceMs: number
    /** Clone mode: boot one template, snapshot it, and restore a copy-on-write clone per request. */
    readonly snapshot: {
      readonly enabled: boolean
      readonly dir: string
      /** Give each clone fresh entropy and the time before it serves. Off only to show why it is on. */
      readonly reseed: boolean
      /**
       * When the template is saved: once the guest answers (`ready`), or once
       * it prints `vmcgi: booted` (`boot`), before its app starts, so that each
       * clone starts the app itself and nothing the app drew repeats.
       */
      readonly at: 'ready' | 'boot'
    }
  }
  readonly pool: {
    /** VMs kept booted (or restored) ahead of demand; 0 boots on demand. */
    readonly size: number
    /** Requests for readiness.path that a pooled VM answers before it is handed out. */
    readonly warmUpRequests: number
  }
  readonly admin: {
    /** Listener for /metrics, apart from the proxy; port 0 picks a free one. */
    readonly enabled: boolean
    readonly host: string
    readonly port: number
  }
  readonly readiness: {
    readonly path: string
    readonly timeoutMs: number
    readonly intervalMs: number
    readonly attemptTimeoutMs: number
    /** A console line that makes vmcgi probe at once; empty to rely on polling. */
    readonly consoleLine: string
  }
  readonly timeouts: {
    /** From sending the request into the guest to its response headers. */
    readonly headersMs: number
    /** Longest silence while the guest sends the response body. */
    readonly bodyIdleMs: number
    /** The whole request, from arrival to the last byte of the response. */
    readonly requestMs: number
    /** Longest silence while the client sends its request body. */
    readonly clientBodyIdleMs: number
    /** The whole request body, from the request's arrival to its last byte. */
    readonly clientBodyMs: number
  }
  readonly limits: {
    /** VMs running at once; by default sized from the host's memory and CPUs. */
    readonly maxVms: number
    /**
     * Client connections held at once; one more is closed as soon as it is
     * accepted. By default sized from the descriptor limit, with room for
     * every VM's own descriptors.
     */
    readonly connections: number
    readonly queue: { readonly size: number; readonly maxWaitMs: number }
    readonly bodyLimitBytes: number
    /** Request bodies up to this size are read whole before a VM is taken; larger ones stream into it. */
    readonly bodyBufferBytes: number
  }
  readonly preflight: {
    /** Boot one VM at start and wait for its guest, so that a broken image fails fast. */
    readonly boot: boolean
  }
  readonly shutdown: {
    /** How long requests in flight may go on after SIGTERM before their VMs are killed. */
    readonly drainMs: number
  }
}

const positiveInt = { type: 'integer', minimum: 1 } as const
/** Node's timers fire at once for delays over 2^31 - 1 ms (about 24.8 days), so no duration may be longer. */
const positiveMs = { type: 'integer', minimum: 1, maximum: 2 ** 31 - 1 } as const
const port = { type: 'integer', minimum: 0, maximum: 65535 } as const
const urlPath = { type: 'string', pattern: '^/' } as const

const schema = {
  type: 'object',
  additionalProperties: false,
  properties: {
    $schema: { type: 'string' },
    listen: {
      type: 'object',
      additionalProperties: false,
      default: {},
      properties: {
        host: { type: 'string', minLength: 1, default: '127.0.0.1' },
        port: { ...port, default: 8080 },
      },
    },
    health: {
      type: 'object',
      additionalProperties: false,
      default: {},
      properties: { path: { ...urlPath, default: '/up' } },
    },
    log: {
      type: 'object',
      additionalProperties: false,
      default: {},
      properties: {
        level: { enum: ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'], default: 'info' },
      },
    },
    vm: {
      type: 'object',
      additionalProperties: false,
      required: ['kernel'],
      properties: {
        qemu: { type: 'string', minLength: 1, default: 'qemu-system-aarch64' },
        accel: { enum: ['auto', 'kvm', 'hvf', 'tcg'], default: 'auto' },
        machine: { type: 'string', minLength: 1, default: 'virt' },
        kernel: { type: 'string', minLength: 1 },
        cpu: { type: 'string', pattern: '^[A-Za-z0-9][A-Za-z0-9._,=+-]*$|^$', default: '' },
        initrd: { type: 'string', default: '' },
        append: { type: 'string', default: 'console=ttyAMA0 quiet' },
        disk: { type: 'string', default: '' },
        extraArgs: { type: 'array', items: { type: 'string' }, maxItems: 256, default: [] },
        memoryMiB: { type: 'integer', minimum: 16, maximum: 65536, default: 128 },
        cpus: { type: 'integer', minimum: 1, maximum: 64, default: 1 },
        guestPort: { type: 'integer', minimum: 1, maximum: 65535, default: 80 },
        consoleTailBytes: { type: 'integer', minimum: 256, maximum: 1048576, default: 8192 },
        killGraceMs: { type: 'integer', minimum: 0, maximum: 60000, default: 500 },
        snapshot: {
          type: 'object',
          additionalProperties: false,
          default: {},
          properties: {
            enabled: { type: 'boolean', default: false },
            // A folder of this user's own (see vm/snapshot.ts): /tmp is everyone's.
            dir: { type: 'string', minLength: 1, default: join(tmpdir(), `vmcgi-${process.getuid?.() ?? 'user'}`) },
            reseed: { type: 'boolean', default: true },
            at: { enum: ['ready', 'boot'], default: 'ready' },
          },
        },
      },
    },
    pool: {
      type: 'object',
      additionalProperties: false,
      default: {},
      properties: {
        size: { type: 'integer', minimum: 0, maximum: 1024, default: 0 },
        warmUpRequests: { type: 'integer', minimum: 0, maximum: 100, default: 3 },
      },
    },
    admin: {
      type: 'object',
      additionalProperties: false,
      default: {},
      properties: {
        enabled: { type: 'boolean', default: true },
        host: { type: 'string', minLength: 1, default: '127.0.0.1' },
        port: { ...port, default: 9090 },
      },
    },
    readiness: {
      type: 'object',
      additionalProperties: false,
      default: {},
      properties: {
        path: { ...urlPath, default: '/' },
        timeoutMs: { ...positiveMs, default: 10000 },
        intervalMs: { ...positiveMs, default: 20 },
        attemptTimeoutMs: { ...positiveMs, default: 150 },
        consoleLine: { type: 'string', default: 'vmcgi: ready' },
      },
    },
    timeouts: {
      type: 'object',
      additionalProperties: false,
      default: {},
      properties: {
        headersMs: { ...positiveMs, default: 15000 },
        bodyIdleMs: { ...positiveMs, default: 10000 },
        requestMs: { ...positiveMs, default: 25000 },
        clientBodyIdleMs: { ...positiveMs, default: 5000 },
        clientBodyMs: { ...positiveMs, default: 15000 },
      },
    },
    limits: {
      type: 'object',
      additionalProperties: false,
      default: {},
      properties: {
        maxVms: positiveInt,
        connections: positiveInt,
        queue: {
          type: 'object',
          additionalProperties: false,
          default: {},
          properties: {
            size: { type: 'integer', minimum: 0, maximum: 100000 },
            maxWaitMs: { ...positiveMs, default: 5000 },
          },
        },
        bodyLimitBytes: { type: 'integer', minimum: 0, maximum: 2 ** 30, default: 10 * 1024 * 1024 },
        bodyBufferBytes: { type: 'integer', minimum: 0, maximum: 64 * 1024 * 1024, default: 256 * 1024 },
      },
    },
    preflight: {
      type: 'object',
      additionalProperties: false,
      default: {},
      properties: { boot: { type: 'boolean', default: true } },
    },
    shutdown: {
      type: 'object',
      additionalProperties: false,
      default: {},
      properties: { drainMs: { type: 'integer', minimum: 0, maximum: 60000, default: 5000 } },
    },
  },
  required: ['vm'],
} as const

const validate = new Ajv({ useDefaults: true, allErrors: false, strict: true }).compile(schema)

export interface Overrides {
  host?: string
  port?: number
}

/** Reads, validates and freezes the config file. Throws ConfigError naming the field. */
export function loadConfig(file: string, overrides: Overrides = {}): Config {
  const path = resolve(file)
  let text: string
  try {
    text = readFileSync(path, 'utf8')
  } catch (error) {
    throw new ConfigError('--config', `cannot read ${path}: ${(error as NodeJS.ErrnoException).code}`)
  }
  let raw: unknown
  try {
    raw = JSON.parse(text)
  } catch (error) {
    throw new ConfigError('--config', `${path} is not valid JSON: ${(error as Error).message}`)
  }
  return normalizeConfig(raw, { baseDir: dirname(path), overrides })
}

type Writable<T> = { -readonly [K in keyof T]: T[K] }

/** Applies defaults and overrides, validates, resolves paths and freezes. */
export function normalizeConfig(
  raw: unknown,
  { baseDir, overrides = {}, env = process.env, host = hostSize() }: {
    baseDir: string
    overrides?: Overrides
    env?: NodeJS.ProcessEnv
    host?: HostSize
  },
): Config {
  const candidate = structuredClone(raw) as Record<string, unknown>
  // Precedence: flag, then environment, then file, then default.
  const fromEnv = new Map<string, string>()
  if (candidate && typeof candidate === 'object' && !Array.isArray(candidate)) {
    for (const [name, { field, parse }] of Object.entries(environmentVariables)) {
      const text = env[name]
      if (text === undefined || text === '') continue
      setField(candidate, field, parse(name, text))
      fromEnv.set(field, name)
    }
    if (overrides.host !== undefined) setField(candidate, 'listen.host', overrides.host)
    if (overrides.port !== undefined) setField(candidate, 'listen.port', overrides.port)
  }
  if (!validate(candidate)) {
    const error = toConfigError(validate.errors![0]!)
    const variable = fromEnv.get(error.field)
    throw variable ? new ConfigError(`${variable} (${error.field})`, error.message.slice(error.field.length + 2)) : error
  }
  // Valid, so shaped as a Config, except for the limits still to be sized for this host.
  const valid = candidate as unknown as Omit<Config, 'limits'> & { limits: { maxVms?: number; connections?: number; queue: { size?: number } } }

  const vm = valid.vm as Writable<Config['vm']>
  vm.kernel = kernelFile('vm.kernel', resolve(baseDir, vm.kernel))
  if (vm.initrd) vm.initrd = readableFile('vm.initrd', resolve(baseDir, vm.initrd))
  if (vm.disk) vm.disk = readableFile('vm.disk', resolve(baseDir, vm.disk))
  vm.extraArgs = checkedExtraArgs(vm.extraArgs)
  vm.qemu = findExecutable('vm.qemu', vm.qemu, baseDir, env.PATH ?? '')
  const snapshot = vm.snapshot as Writable<Config['vm']['snapshot']>
  snapshot.dir = resolve(baseDir, snapshot.dir)
  const { limits } = valid
  limits.maxVms ??= defaultMaxVms(vm.memoryMiB, host)
  limits.queue.size ??= limits.maxVms * 4
  limits.connections ??= defaultConnections(host.openFiles, limits.maxVms + valid.pool.size)
  // What the host can hold: every VM, pooled or serving, with all its memory.
  if (vm.memoryMiB > host.memoryMiB) {
    throw new ConfigError('vm.memoryMiB', `${vm.memoryMiB} MiB is more than this host's ${host.memoryMiB} MiB`)
  }
  const fit = Math.floor(host.memoryMiB / vm.memoryMiB)
  if (limits.maxVms + valid.pool.size > fit) {
    const field = limits.maxVms > fit ? 'limits.maxVms' : 'pool.size'
    throw new ConfigError(field, `limits.maxVms + pool.size (${limits.maxVms} + ${valid.pool.size}) VMs of ${vm.memoryMiB} MiB do not fit in this host's ${host.memoryMiB} MiB (at most ${fit})`)
  }
  return deepFreeze(valid as Config)
}

const asText = (_name: string, text: string) => text
const asWholeNumber = (name: string, text: string) => {
  if (!/^\d+$/.test(text)) throw new ConfigError(name, `must be a whole number, not "${text}"`)
  return Number(text)
}

/** Settings that may come from the environment (for Kamal's env section), by variable. */
export const environmentVariables: Record<string, { field: string; parse: (name: string, text: string) => unknown }> = {
  VMCGI_HOST: { field: 'listen.host', parse: asText },
  VMCGI_PORT: { field: 'listen.port', parse: asWholeNumber },
  VMCGI_ADMIN_PORT: { field: 'admin.port', parse: asWholeNumber },
  VMCGI_MAX_VMS: { field: 'limits.maxVms', parse: asWholeNumber },
  VMCGI_POOL_SIZE: { field: 'pool.size', parse: asWholeNumber },
  VMCGI_ACCEL: { field: 'vm.accel', parse: asText },
  LOG_LEVEL: { field: 'log.level', parse: asText },
}

function setField(target: Record<string, unknown>, field: string, value: unknown): void {
  const [section, key] = field.split('.') as [string, string]
  if (typeof target[section] !== 'object' || target[section] === null) target[section] = {}
  const fields = target[section] as Record<string, unknown>
  fields[key] = value
}

export interface HostSize {
  cpus: number
  memoryMiB: number
  /** How many descriptors vmcgi may have open (the soft RLIMIT_NOFILE); undefined where that cannot be told. */
  openFiles?: number
}

function hostSize(): HostSize {
  return { cpus: availableParallelism(), memoryMiB: Math.floor(totalmem() / 2 ** 20), openFiles: openFileLimit() }
}

/** The soft limit on open descriptors, from /proc/self/limits (Linux); Node has raised it to the hard limit already. */
function openFileLimit(): number | undefined {
  try {
    const soft = /^Max open files\s+(\d+)\s/m.exec(readFileSync('/proc/self/limits', 'latin1'))?.[1]
    return soft === undefined ? undefined : Number(soft)
  } catch {
    return undefined
  }
}

/**
 * What vmcgi itself holds (stdio, the event loop's, its listeners, log and
 * /proc reads), and what each VM holds while it boots and serves: QEMU's
 * stdio pipes, up to 33 readiness probes, the connection into the guest, QMP,
 * a warm-up request, get-port's probe, and the pipes a spawn makes for a moment.
 */
const ownDescriptors = 32
const descriptorsPerVm = 48

/**
 * Connections that leave every VM (serving or pooled) its descriptors, so that
 * idle clients cannot starve a boot of them; at least one per VM; 1024 where
 * the limit is unknown.
 */
export function defaultConnections(openFiles: number | undefined, vms: number): number {
  if (openFiles === undefined) return 1024
  return Math.max(vms, openFiles - ownDescriptors - descriptorsPerVm * vms)
}

/**
 * Booting is CPU-bound, so two VMs per core keep the CPUs busy without
 * starving them; and VMs may take at most half of the host's memory, counting
 * about 64 MiB of QEMU's own on top of the guest's.
 */
export function defaultMaxVms(guestMemoryMiB: number, host: HostSize): number {
  const byMemory = Math.floor(host.memoryMiB / 2 / (guestMemoryMiB + 64))
  return Math.max(1, Math.min(host.cpus * 2, byMemory))
}

function toConfigError(error: ErrorObject): ConfigError {
  const at = error.instancePath.slice(1).replaceAll('/', '.')
  const field = (name: string) => (at ? `${at}.${name}` : name)
  switch (error.keyword) {
    case 'additionalProperties':
      return new ConfigError(field(error.params.additionalProperty), 'unknown key')
    case 'required':
      return new ConfigError(field(error.params.missingProperty), 'is required')
    case 'enum':
      return new ConfigError(at, `must be one of ${error.params.allowedValues.join(', ')}`)
    default:
      return new ConfigError(at || '(top level)', error.message ?? 'is invalid')
  }
}

function readableFile(field: string, path: string): string {
  try {
    accessSync(path, constants.R_OK)
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code
    throw new ConfigError(field, code === 'ENOENT' ? `file not found: ${path}` : `cannot read ${path} (${code})`)
  }
  if (!statSync(path).isFile()) throw new ConfigError(field, `not a regular file: ${path}`)
  return path
}

/**
 * Options whose own copies vmcgi depends on: its network (the one forwarded
 * port, restrict=on), its console, its sandbox, QMP for clones, and the
 * kernel it was given. An extra one would replace or bypass them.
 */
const reservedOptions = new Set([
  '-netdev', '-net', '-nic', '-chardev', '-serial', '-monitor', '-qmp', '-qmp-pretty', '-mon', '-sandbox',
  '-kernel', '-initrd', '-append', '-incoming', '-daemonize', '-pidfile', '-runas', '-chroot', '-S',
  '-machine', '-M', '-accel', '-cpu', '-m', '-smp', '-name', '-nodefaults', '-readconfig', '-writeconfig',
])

function checkedExtraArgs(args: readonly string[]): string[] {
  for (const [index, arg] of args.entries()) {
    const option = arg.startsWith('--') ? arg.slice(1) : arg
    if (reservedOptions.has(option.split('=')[0]!)) {
      throw new ConfigError(`vm.extraArgs.${index}`, `${arg} is set by vmcgi itself (use the vm field for it, if there is one)`)
    }
  }
  return [...args]
}

/**
 * A readable file that starts as a kernel QEMU can boot with -kernel: an ELF
 * (vmlinux, or a kernel of another OS), an arm64 Image, an x86 bzImage, a
 * U-Boot image, or a gzip-compressed one. Anything else would be jumped into
 * and hang the guest until the boot timeout.
 */
function kernelFile(field: string, path: string): string {
  readableFile(field, path)
  const head = Buffer.alloc(0x210)
  const fd = openSync(path, 'r')
  let length
  try {
    length = readSync(fd, head, 0, head.length, 0)
  } finally {
    closeSync(fd)
  }
  const at = (offset: number, magic: string) => head.subarray(offset, offset + magic.length).toString('latin1') === magic
  const kernel = at(0, '\x7fELF') || at(0x38, 'ARM\x64') || at(0x202, 'HdrS') || at(0, '\x27\x05\x19\x56') || at(0, '\x1f\x8b')
  if (length < 4 || !kernel) {
    throw new ConfigError(field, `${path} is not a kernel QEMU can boot (not an ELF, arm64 Image, x86 bzImage, U-Boot or gzip image)`)
  }
  return path
}

/** A bare name is looked up on PATH; anything with a slash is a path relative to the config. */
function findExecutable(field: string, name: string, baseDir: string, pathVar: string): string {
  const candidates = name.includes('/') || isAbsolute(name)
    ? [resolve(baseDir, name)]
    : pathVar.split(delimiter).filter(Boolean).map((dir) => join(dir, name))
  for (const candidate of candidates) {
    try {
      accessSync(candidate, constants.X_OK)
      if (statSync(candidate).isFile()) return candidate
    } catch {
      // try the next one
    }
  }
  throw new ConfigError(field, name.includes('/') ? `not an executable file: ${candidates[0]}` : `${name} not found on PATH`)
}

function deepFreeze<T>(value: T): T {
  if (value && typeof value === 'object') {
    for (const inner of Object.values(value)) deepFreeze(inner)
    Object.freeze(value)
  }
  return value
}
