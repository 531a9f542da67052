// What this host's QEMU can do, found out once at start: the version, whether
// -sandbox is built in, which accelerator to use, and how to make QEMU die
// together with vmcgi.

import { execa } from 'execa'
import type { Config } from '../config.js'
import { ConfigError } from '../errors.js'
import { chooseAccel, guestArchOf, readHostFacts } from './accel.js'
import type { VmEnvironment } from './vm.js'

export interface HostProbe extends VmEnvironment {
  qemuVersion: string
}

export async function probeHost(config: Config): Promise<HostProbe> {
  const version = await execa(config.vm.qemu, ['-version'], { reject: false, timeout: 10_000 })
  if (version.failed) {
    throw new ConfigError('vm.qemu', `${config.vm.qemu} -version failed: ${version.stderr || version.shortMessage}`)
  }
  const qemuVersion = /version ([^\s(]+)/.exec(version.stdout)?.[1] ?? 'unknown'
  const help = await execa(config.vm.qemu, ['-help'], { reject: false, timeout: 10_000 })
  return {
    config,
    qemuVersion,
    sandbox: /^-sandbox\b/m.test(help.stdout),
    accel: chooseAccel(config.vm.accel, guestArchOf(config.vm.qemu), readHostFacts()),
    deathSignalPrefix: await deathSignalPrefix(),
  }
}

/**
 * On Linux, util-linux's setpriv sets PR_SET_PDEATHSIG before it execs QEMU, so
 * the kernel kills QEMU when vmcgi dies, even by SIGKILL. Elsewhere QEMU is
 * killed on vmcgi's normal exit only.
 */
async function deathSignalPrefix(): Promise<string[]> {
  if (process.platform !== 'linux') return []
  const probe = await execa('setpriv', ['--pdeathsig', 'KILL', '--', 'true'], { reject: false, timeout: 5_000 })
  return probe.failed ? [] : ['setpriv', '--pdeathsig', 'KILL', '--']
}
