// The folders a build flattens an image in, inside the image cache. Each is
// named for the process that made it, so that a build killed before it could
// clean up (SIGKILL, a crash, a full disk) is found by the next one and its
// half-made root removed; the folders of builds still running are left alone.

import { mkdtempSync, readdirSync, rmSync } from 'node:fs'
import { join } from 'node:path'
import { isAlive } from '../alive.js'

const pattern = /^tmp-(\d+)-/

/** A new, empty work folder of this process in `cache`. */
export function makeWorkDir(cache: string): string {
  return mkdtempSync(join(cache, `tmp-${process.pid}-`))
}

/** Removes the work folders in `cache` whose process is gone; returns their names. */
export function removeAbandonedWorkDirs(cache: string): string[] {
  const removed: string[] = []
  for (const name of readdirSync(cache)) {
    const pid = Number(pattern.exec(name)?.[1] ?? 0)
    if (pid > 0 && pid !== process.pid && !isAlive(pid)) {
      rmSync(join(cache, name), { recursive: true, force: true })
      removed.push(name)
    }
  }
  return removed
}
