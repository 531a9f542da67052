// The field a refusal names: the `field` of the error `run` throws, which must
// be of `type` (ConfigError for a config, ImageError for an image build).

import { expect } from 'vitest'

export function fieldOf(type: new (...args: never[]) => Error & { field: string }, run: () => unknown): string {
  try {
    run()
  } catch (error) {
    expect(error).toBeInstanceOf(type)
    return (error as { field: string }).field
  }
  throw new Error(`expected a ${type.name}`)
}
