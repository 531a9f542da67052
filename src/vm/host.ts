// What this host's QEMU can do, found out once at start: the version, whether
// -sandbox is built in, which accelerator to use, and how to make QEMU die
// together with vmcgi (through a keeper when vm.qemu is a wrapper script).

import { closeSync, openSync, readSync } from 'node:fs'
import { execa } from 'execa'
import type { Config } from '../config.js'
import { ConfigError } from '../errors.js'
import type { FastifyBaseLogger } from 'fastify'
import { chooseAccel, guestArchOf, readHostFacts, type Accel, type GuestArch, type HostFacts } from './accel.js'
import { HeldDisk } from './disk.js'
import { createQemuVmFactory, type VmEnvironment } from './vm.js'

export interface HostProbe extends VmEnvironment {
  qemuVersion: string
}

export async function probeHost(config: Config): Promise<HostProbe> {
  const version = await execa(config.vm.qemu, ['-version'], { reject: false, timeout: 10_000 })
  if (version.failed) {
    throw new ConfigError('vm.qemu', `${config.vm.qemu} -version failed: ${version.stderr || version.shortMessage}`)
  }
  const qemuVersion = /version ([^\s(]+)/.exec(version.stdout)?.[1] ?? 'unknown'
  const machines = await execa(config.vm.qemu, ['-machine', 'help'], { reject: false, timeout: 10_000 })
  const machine = config.vm.machine.split(',')[0]!
  if (!new RegExp(`^${machine}\\s`, 'm').test(machines.stdout)) {
    throw new ConfigError('vm.machine', `${config.vm.qemu} does not emulate the machine "${machine}"`)
  }
  const help = await execa(config.vm.qemu, ['-help'], { reject: false, timeout: 10_000 })
  const guest = guestArchOf(config.vm.qemu)
  const facts = readHostFacts()
  const accel = chooseAccel(config.vm.accel, guest, facts)
  // An accelerator asked for by name must work; auto only picks one that should.
  const problem = acceleratorProblem(accel.accel, guest, facts)
  if (config.vm.accel !== 'auto' && problem) throw new ConfigError('vm.accel', `${accel.accel} cannot be used here: ${problem}`)
  return {
    config,
    qemuVersion,
    sandbox: /^-sandbox\b/m.test(help.stdout),
    accel,
    ...await qemuLauncher(config.vm.qemu),
    ...(config.vm.disk ? { disk: new HeldDisk(config.vm.disk) } : {}),
  }
}

/**
 * Boots one VM and waits for its guest to answer, so that a broken image,
 * emulator or accelerator shows at start rather than on the first request.
 * With `auto`, an accelerator that fails falls back to TCG with a warning.
 */
export async function preflightBoot(host: HostProbe, log: FastifyBaseLogger): Promise<HostProbe> {
  const attempt = async (env: HostProbe) => {
    const vm = createQemuVmFactory(env)(log)
    try {
      await vm.boot(new AbortController().signal)
      log.info({ vm: vm.id, bootMs: vm.bootMs, accel: env.accel.accel }, 'preflight boot answered')
      return null
    } catch (error) {
      return { error: error as Error, console: vm.consoleTail() }
    } finally {
      await vm.destroy(new Error('the preflight boot is over'))
    }
  }
  const failed = await attempt(host)
  if (!failed) return host
  if (host.config.vm.accel === 'auto' && host.accel.accel !== 'tcg') {
    log.warn({ err: failed.error, console: failed.console }, `the guest did not boot with ${host.accel.accel}; falling back to tcg`)
    const tcg: HostProbe = { ...host, accel: { accel: 'tcg', reason: `${host.accel.accel} failed the preflight boot` } }
    const again = await attempt(tcg)
    if (!again) return tcg
  }
  const tail = failed.console.trim().split('\n').slice(-3).join(' | ')
  throw new ConfigError('vm', `the guest did not boot: ${failed.error.message}${tail ? ` (console: ${tail})` : ''}`)
}

function acceleratorProblem(accel: Accel, guest: GuestArch, facts: HostFacts): string | null {
  if (accel === 'tcg') return null
  if (accel === 'kvm') {
    if (facts.platform !== 'linux') return 'KVM exists on Linux only'
    return chooseAccel('auto', guest, facts).accel === 'kvm' ? null : chooseAccel('auto', guest, facts).reason
  }
  if (facts.platform !== 'darwin') return 'HVF exists on macOS only'
  return chooseAccel('auto', guest, facts).accel === 'hvf' ? null : chooseAccel('auto', guest, facts).reason
}

/**
 * On Linux, util-linux's setpriv sets PR_SET_PDEATHSIG before it execs QEMU, so
 * the kernel kills QEMU when vmcgi dies, even by SIGKILL. Elsewhere QEMU is
 * killed on vmcgi's normal exit only.
 *
 * The death signal is not inherited across fork, so a wrapper script that does
 * not exec QEMU would leave QEMU running: a script is started by the keeper
 * instead, which is given the death signal and kills its whole process group
 * when it arrives.
 */
async function qemuLauncher(qemu: string): Promise<{ deathSignalPrefix: string[]; keeper: boolean }> {
  if (process.platform !== 'linux') return { deathSignalPrefix: [], keeper: false }
  const probe = await execa('setpriv', ['--pdeathsig', 'KILL', '--', 'true'], { reject: false, timeout: 5_000 })
  if (probe.failed) return { deathSignalPrefix: [], keeper: false }
  if (isScript(qemu)) return { deathSignalPrefix: [...keeperPrefix], keeper: true }
  return { deathSignalPrefix: ['setpriv', '--pdeathsig', 'KILL', '--'], keeper: false }
}

/**
 * A shell that leads QEMU's process group (QemuProcess spawns it detached),
 * starts the wrapper and passes its exit status on. SIGHUP, its death signal
 * and a signal vmcgi sends no group, kills the group. A background job's
 * stdin would be /dev/null (POSIX, even with `<&0`), so it is passed through
 * descriptor 9; 3, 4, … are QEMU's inherited descriptors.
 */
export const keeperPrefix: readonly string[] = [
  'setpriv', '--pdeathsig', 'HUP', '--',
  'sh', '-c', 'trap "kill -KILL 0" HUP; exec 9<&0; "$@" <&9 9<&- & exec 9<&-; wait $!', 'vmcgi-qemu',
]

/** Whether `file` starts with #!, read once at start. */
function isScript(file: string): boolean {
  const start = Buffer.alloc(2)
  let fd: number | undefined
  try {
    fd = openSync(file, 'r')
    return readSync(fd, start, 0, 2, 0) === 2 && start.toString('latin1') === '#!'
  } catch {
    return false
  } finally {
    if (fd !== undefined) closeSync(fd)
  }
}
