#!/usr/bin/env node
// The CLI behind `npm run images -- --from-image SOURCE --out DIR`: a
// container image in, a vmcgi guest and its config out (see build.ts). A
// wrong option, source or image exits with status 2 and says which.

import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { parseArgs } from 'node:util'
import { restoreSignals, type RunOverrides } from './app.js'
import { buildImageGuest } from './build.js'
import { ImageError } from './errors.js'
import type { GuestArch } from './source.js'

const usage = `usage: npm run images -- --from-image SOURCE --out DIR [--arch aarch64|x86_64]
         [--port N] [--readiness-path PATH] [--memory MIB] [--clone ready|boot] [--restore-signal SIG]
         [--entrypoint CMD] [--cmd CMD] [--env NAME=VALUE]... [--workdir DIR] [--user USER[:GROUP]]
SOURCE: docker-daemon:NAME:TAG, docker-archive:PATH (docker save) or oci:PATH[:REF] (an OCI layout).
CMD: a JSON array (["python3", "app.py"]) or words split at spaces.
--clone: clone mode, the template saved once the app answers (ready: fastest,
but what the app drew at start-up repeats in every clone) or before the app
starts (boot: every clone starts the app).
--restore-signal: with --clone ready, the app is sent SIG (SIGUSR1, SIGUSR2,
SIGHUP or SIGWINCH) in each clone before its request: its cue to draw again
what it drew at start-up.`

function parseCli(argv: string[]) {
  let values
  try {
    values = parseArgs({
      args: argv,
      options: {
        'from-image': { type: 'string' },
        out: { type: 'string' },
        arch: { type: 'string' },
        port: { type: 'string' },
        'readiness-path': { type: 'string', default: '/' },
        memory: { type: 'string', default: '256' },
        clone: { type: 'string' },
        'restore-signal': { type: 'string' },
        entrypoint: { type: 'string' },
        cmd: { type: 'string' },
        env: { type: 'string', multiple: true },
        workdir: { type: 'string' },
        user: { type: 'string' },
        help: { type: 'boolean', short: 'h' },
      },
      strict: true,
      allowPositionals: false,
    }).values
  } catch (error) {
    throw new ImageError('arguments', (error as Error).message)
  }
  if (values.help) {
    process.stdout.write(`${usage}\n`)
    process.exit(0)
  }
  if (!values['from-image']) throw new ImageError('from-image', 'is required')
  if (!values.out) throw new ImageError('out', 'is required')
  if (values.arch !== undefined && values.arch !== 'aarch64' && values.arch !== 'x86_64') {
    throw new ImageError('arch', `must be aarch64 or x86_64, not "${values.arch}"`)
  }
  const overrides: RunOverrides = {
    ...(values.entrypoint !== undefined ? { entrypoint: words('entrypoint', values.entrypoint) } : {}),
    ...(values.cmd !== undefined ? { cmd: words('cmd', values.cmd) } : {}),
    ...(values.env ? { env: values.env } : {}),
    ...(values.workdir !== undefined ? { workdir: values.workdir } : {}),
    ...(values.user !== undefined ? { user: values.user } : {}),
    ...(values.port !== undefined ? { port: whole('port', values.port, 1, 65535) } : {}),
  }
  if (values.clone !== undefined && values.clone !== 'ready' && values.clone !== 'boot') {
    throw new ImageError('clone', `must be ready or boot, not "${values.clone}"`)
  }
  const restoreSignal = values['restore-signal']
  if (restoreSignal !== undefined) {
    if (values.clone !== 'ready') throw new ImageError('restore-signal', 'is for --clone ready only: without a snapshot of the started app there is nothing to restore')
    if (!Object.hasOwn(restoreSignals, restoreSignal)) {
      throw new ImageError('restore-signal', `must be one of ${Object.keys(restoreSignals).join(', ')}, not "${restoreSignal}"`)
    }
  }
  const readinessPath = values['readiness-path']
  if (!readinessPath.startsWith('/')) throw new ImageError('readiness-path', `must start with "/", not "${readinessPath}"`)
  return {
    source: values['from-image'],
    out: values.out,
    ...(values.arch ? { arch: values.arch as GuestArch } : {}),
    memoryMiB: whole('memory', values.memory, 16, 65536),
    readinessPath,
    ...(values.clone ? { clone: values.clone as 'ready' | 'boot' } : {}),
    ...(restoreSignal !== undefined ? { restoreSignal: restoreSignals[restoreSignal]! } : {}),
    overrides,
  }
}

function whole(field: string, text: string, min: number, max: number): number {
  const value = Number(text)
  if (!/^\d+$/.test(text) || value < min || value > max) throw new ImageError(field, `must be a whole number from ${min} to ${max}, not "${text}"`)
  return value
}

/** A JSON array of strings, or words split at spaces, as Docker's exec and shell forms are written. */
function words(field: string, text: string): string[] {
  if (text.trim().startsWith('[')) {
    let parsed: unknown
    try {
      parsed = JSON.parse(text)
    } catch (error) {
      throw new ImageError(field, `is not a JSON array: ${(error as Error).message}`)
    }
    if (!Array.isArray(parsed) || !parsed.every((item) => typeof item === 'string')) throw new ImageError(field, 'must be an array of strings')
    return parsed as string[]
  }
  return text.split(/\s+/).filter(Boolean)
}

const imagesDir = join(dirname(fileURLToPath(import.meta.url)), '..', '..', 'images')
try {
  const built = await buildImageGuest({ ...parseCli(process.argv.slice(2)), imagesDir, log: (line) => process.stderr.write(`${line}\n`) })
  process.stdout.write(`serve it with: vmcgi --config ${built.configPath}\n`)
} catch (error) {
  if (error instanceof ImageError) {
    process.stderr.write(`images: ${error.field}: ${error.message}\n`)
    if (error.field === 'arguments') process.stderr.write(`${usage}\n`)
    process.exit(2)
  }
  process.stderr.write(`images: ${(error as Error).message}\n`)
  process.exit(1)
}
