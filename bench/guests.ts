// The two guests the bench serves: the default one of config.example.json,
// and the Python test image (test/images/build.sh) made into a guest with
// `images/build.sh --from-image`, as a user would.

import { execFileSync } from 'node:child_process'
import { existsSync, readFileSync } from 'node:fs'
import { isAbsolute, join } from 'node:path'
import { execa } from 'execa'
import { normalizeConfig, type Config } from '../src/config.js'
import { chooseAccel, guestArchOf, readHostFacts } from '../src/vm/accel.js'
import { repo } from '../test/support/vmcgi.js'

export type RawConfig = Record<string, Record<string, unknown>>

export interface Guest {
  /** The config file's content, its paths made absolute. */
  raw: RawConfig
  config: Config
  accel: ReturnType<typeof chooseAccel>
  qemuVersion: string
}

function guestOf(raw: RawConfig, baseDir: string): Guest {
  const vm = { ...raw.vm }
  for (const key of ['kernel', 'initrd', 'disk']) {
    const path = vm[key]
    if (typeof path === 'string' && path !== '' && !isAbsolute(path)) vm[key] = join(baseDir, path)
  }
  const absolute = { ...raw, vm }
  const config = normalizeConfig(absolute, { baseDir })
  const accel = chooseAccel(config.vm.accel, guestArchOf(config.vm.qemu), readHostFacts())
  const qemuVersion = /version ([^\s(]+)/.exec(execFileSync(config.vm.qemu, ['-version']).toString())?.[1] ?? 'unknown'
  return { raw: absolute, config, accel, qemuVersion }
}

/** The guest of config.example.json. */
export function defaultGuest(): Guest {
  return guestOf(JSON.parse(readFileSync(join(repo, 'config.example.json'), 'utf8')) as RawConfig, repo)
}

export const pythonImage = join(repo, 'images/out/test-images/python')

/**
 * Builds the Python test image into a guest in `out` (cached by the build:
 * seconds when the image, kernel and init are unchanged) and returns it with
 * the config the build wrote. Throws, with the build's output, if it fails.
 */
export async function pythonGuest(out: string): Promise<Guest> {
  if (!existsSync(pythonImage)) throw new Error(`no ${pythonImage}: run \`bash test/images/build.sh\` (as root) first`)
  const build = await execa('bash', [join(repo, 'images/build.sh'), '--from-image', `oci:${pythonImage}:latest`, '--out', out], {
    reject: false, all: true, timeout: 15 * 60_000, stdin: 'ignore',
  })
  if (build.exitCode !== 0) throw new Error(`images/build.sh --from-image failed (${build.exitCode ?? build.signal}):\n${build.all?.split('\n').slice(-15).join('\n')}`)
  return guestOf(JSON.parse(readFileSync(join(out, 'vmcgi.json'), 'utf8')) as RawConfig, out)
}
