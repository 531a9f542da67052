// What the guest's init runs: the image's config (Entrypoint, Cmd, Env,
// WorkingDir, User, ExposedPorts) with `docker run`'s overrides applied, and
// its encoding in /vmcgi/app of the initramfs (see images/image-init.c).

import { ImageError } from './errors.js'
import { resolveUser, type ResolvedUser } from './user.js'

/** The `config` object of an OCI image config (or a Docker one: the same fields). */
export interface ImageRunConfig {
  User?: string
  Env?: string[] | null
  Entrypoint?: string[] | null
  Cmd?: string[] | null
  WorkingDir?: string
  ExposedPorts?: Record<string, object> | null
}

/** What `docker run` would let the user change. */
export interface RunOverrides {
  entrypoint?: string[]
  cmd?: string[]
  env?: string[]
  workdir?: string
  user?: string
  port?: number
}

export interface App {
  argv: string[]
  env: string[]
  cwd: string
  user: ResolvedUser
  port: number
  /** Sent to the app in each clone of a template saved after it started (--restore-signal); the guest's number. */
  restoreSignal?: number
}

/**
 * The signals --restore-signal may name, by their Linux numbers, which are
 * the same on x86_64 and aarch64: ones an app can catch and that mean
 * nothing else to it by default (SIGHUP ends a program that does not catch it,
 * so it is the app's to choose knowingly).
 */
export const restoreSignals: Record<string, number> = { SIGHUP: 1, SIGUSR1: 10, SIGUSR2: 12, SIGWINCH: 28 }

/** The PATH Docker gives an image whose Env has none. */
export const defaultPath = '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'

export function appFor(
  config: ImageRunConfig,
  overrides: RunOverrides,
  etc: { passwd: string; group: string },
  hostEnv: NodeJS.ProcessEnv = process.env,
): App {
  // An entrypoint given on the command line drops the image's Cmd, as in Docker.
  const entrypoint = overrides.entrypoint ?? strings(config.Entrypoint, 'Entrypoint')
  const cmd = overrides.cmd ?? (overrides.entrypoint ? [] : strings(config.Cmd, 'Cmd'))
  const argv = [...entrypoint, ...cmd]
  if (argv.length === 0 || !argv[0]) {
    throw new ImageError('cmd', 'the image has no command (no Entrypoint and no Cmd): give one with --cmd')
  }

  const user = resolveUser(overrides.user ?? config.User ?? '', etc.passwd, etc.group)
  const env = new Map<string, string>()
  const set = (entry: string, field: string, fromHost: boolean) => {
    const eq = entry.indexOf('=')
    if (eq === 0) throw new ImageError(field, `"${entry}" is not NAME=VALUE`)
    if (eq > 0) {
      env.set(entry.slice(0, eq), entry.slice(eq + 1))
    } else if (fromHost) {
      // --env NAME passes the variable on from this environment, unset if it is unset, as in Docker.
      const value = hostEnv[entry]
      if (value === undefined) env.delete(entry)
      else env.set(entry, value)
    }
    // An image's own NAME without a value is dropped: the image may not read the build's environment.
  }
  for (const entry of strings(config.Env, 'Env')) set(entry, 'Env', false)
  for (const entry of overrides.env ?? []) set(entry, 'env', true)
  if (!env.has('PATH')) env.set('PATH', defaultPath)
  if (!env.has('HOME')) env.set('HOME', user.home)
  if (!env.has('HOSTNAME')) env.set('HOSTNAME', 'vmcgi')

  const cwd = overrides.workdir ?? (config.WorkingDir || '/')
  if (!cwd.startsWith('/')) throw new ImageError('workdir', `the working directory "${cwd}" is not an absolute path`)

  return { argv, env: [...env].map(([name, value]) => `${name}=${value}`), cwd, user, port: portOf(config, overrides) }
}

/** --port, else the image's one exposed TCP port; several need --port to choose. */
function portOf(config: ImageRunConfig, overrides: RunOverrides): number {
  if (overrides.port !== undefined) return overrides.port
  const exposed = Object.keys(config.ExposedPorts ?? {})
  const tcp = exposed
    .map((key) => /^(\d+)(?:\/tcp)?$/.exec(key))
    .filter((match) => match !== null)
    .map((match) => Number(match[1]))
    .filter((port) => port >= 1 && port <= 65535)
  if (tcp.length === 0) {
    const has = exposed.length ? `only ${exposed.join(', ')}` : 'no ExposedPorts'
    throw new ImageError('port', `the image exposes no TCP port from 1 to 65535 (${has}): give the port the app listens on with --port`)
  }
  if (tcp.length > 1) throw new ImageError('port', `the image exposes several TCP ports (${tcp.join(', ')}): choose one with --port`)
  return tcp[0]!
}

/** A field of the image's config that must be an array of strings (or absent). */
function strings(value: unknown, field: string): string[] {
  if (value === undefined || value === null) return []
  if (!Array.isArray(value) || !value.every((item) => typeof item === 'string')) {
    throw new ImageError(field, `the image's ${field} is not an array of strings: ${JSON.stringify(value)}`)
  }
  return value as string[]
}

/** /vmcgi/app: NUL-terminated key=value strings, in the order images/image-init.c expects. */
export function encodeApp(app: App): Buffer {
  const { uid, gid, groups } = app.user
  const strings = [
    `uid=${uid}`,
    `gid=${gid}`,
    `groups=${groups.join(',')}`,
    `cwd=${app.cwd}`,
    `port=${app.port}`,
    ...(app.restoreSignal !== undefined ? [`restore-signal=${app.restoreSignal}`] : []),
    ...app.env.map((entry) => `env=${entry}`),
    ...app.argv.map((arg) => `arg=${arg}`),
  ]
  for (const text of strings) {
    if (text.includes('\0')) throw new ImageError('config', `a NUL byte cannot be passed to the app: ${JSON.stringify(text)}`)
  }
  return Buffer.from(strings.map((text) => `${text}\0`).join(''))
}
